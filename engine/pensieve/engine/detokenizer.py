"""Output text: incremental detokenization and stop strings.

``TextStream`` is the one owner of a request's output text. Where it runs:
the HTTP server runs one per request in its own process (the engine there
returns token ids only: ``SamplingParams(detokenize=False)`` and no stop
strings); the in-process library (``LLMEngine.step``/``generate``, the chat
CLI) runs one inside the engine for requests that ask for text or stop
strings. Either way a stop string ends the text before it, and the request
ends at the token that completed it.
"""
from __future__ import annotations

PREFIX_TOKENS = 6  # prompt tokens that give the decoder its context


class IncrementalDetokenizer:
    """Decodes a short window of tokens per step.

    ``prefix`` tokens give the decoder context (byte-level and sentencepiece
    tokenizers render a token differently after a space); a delta is released
    only once it does not end in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - PREFIX_TOKENS)
        self.read_offset = len(prompt_ids)

    def step(self, token_ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            return full[len(prefix):]
        return ""


class TextStream:
    """One request's output text, token by token.

    ``push(token)`` appends a generated token's text and says whether it
    completed a stop string (the text then ends just before the stop string);
    ``release(final)`` hands out the text not handed out yet, holding back, until
    ``final``, a tail that could still grow into a stop string. Stop tokens and
    EOS are not pushed (their text is never part of the reply)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | tuple[str, ...] = ()):
        self._ids = list(prompt_ids[-PREFIX_TOKENS:])  # the decoder reads only this window of the prompt
        self._detok = IncrementalDetokenizer(tokenizer, self._ids)
        self.stop = list(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> bool:
        if self.stopped:
            return True
        self._ids.append(token_id)
        self.text += self._detok.step(self._ids)
        if self.stop:
            # A stop string cannot start inside text already released (a tail that could begin one is held back).
            hit = _find_stop(self.text, self.stop, max(0, self.emitted - 256))
            if hit is not None:
                self.text = self.text[:hit]
                self.stopped = True
        return self.stopped

    def release(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else len(self.text) - _stop_prefix_len(self.text, self.stop)
        new = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return new


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
