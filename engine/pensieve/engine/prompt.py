"""Prompt preparation: chat template, the cheap length bound, tokenization.

One owner for turning client text into token ids (the engine's
``encode_chat``/``add_request`` and the HTTP server both come here), so that
every failure is an ``InvalidRequestError`` (HTTP 400) and every prompt is
bounded the same way:

1. Characters first. No text longer than ``max_prompt_chars =
   max_model_len * longest_token * NORMALIZATION_MARGIN`` characters can fit
   in ``max_model_len`` tokens: one token covers at most ``longest_token``
   characters of the normalized text (the longest vocabulary entry, added
   tokens included: byte-level entries hold one character per byte), and
   Unicode composition (NFC, the only normalizer of the supported families
   that shortens text) merges at most 4 code points into one. Such text is
   refused before the tokenizer sees it, in O(1).
2. Tokens next: the fast tokenizer's ``encode_batch`` runs in Rust without
   the GIL, and its token count is read before the ids become a Python list,
   so a prompt that passes the character bound but not the context costs no
   Python objects.

Thread safety: ``encode_text`` and ``encode_chat`` only read the tokenizer
(the Rust tokenizer's encode takes ``&self``; the transformers wrapper, whose
``encode`` may reconfigure truncation, is not used for encoding), so the
server calls them from a thread pool while the engine thread decodes.
"""
from __future__ import annotations

from .errors import ContextLengthExceededError, InvalidRequestError

NORMALIZATION_MARGIN = 4
_MARK = "PENSIEVE0REPLY0MARK"  # stands for a reply's text, to find what a chat template writes after one


class PromptEncoder:
    """Chat template + tokenizer + the bounds of one engine (``max_model_len``)."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._rust = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow (Python) tokenizer
        self.longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = max_model_len * self.longest_token * NORMALIZATION_MARGIN

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation through the checkpoint's chat template (with the generation prompt)."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the template refused the conversation (role order, missing template...)
            raise InvalidRequestError(f"the chat template could not render these messages: {type(e).__name__}: "
                                      f"{str(e)[:200]}",
                                      "messages", code="invalid_value") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode_text(self.render_chat(messages), param="messages", add_special_tokens=False)

    def encode_continuation(self, context: list[int], transcript: list[dict], new: list[dict]) -> list[int] | None:
        """An append-mode turn's prompt: ``context`` (the session's tokens: its prompts and replies
        exactly as the model read and generated them, ending with the last reply) plus the chat
        template's text for the new messages, encoded on its own. None when the template's
        rendering of ``transcript + new`` does not start with its rendering of ``transcript``, or
        does not show the last reply verbatim: the caller then re-renders the whole transcript.

        Why not re-render and re-tokenize the transcript every turn: a reply's text need not encode
        back to the ids the model generated (always so with random weights, sometimes with real
        ones), and every token after the first difference misses the session's KV cache. Here
        the whole previous context matches, and the work per turn is the new messages', not
        the conversation's."""
        if not context or not transcript or not new or transcript[-1].get("role") != "assistant":
            return None
        reply = transcript[-1].get("content")
        if not isinstance(reply, str):
            return None
        try:
            before = self.tokenizer.apply_chat_template(transcript, tokenize=False, add_generation_prompt=False)
            marked = self.tokenizer.apply_chat_template(transcript[:-1] + [{"role": "assistant", "content": _MARK}],
                                                        tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 -- the full render below reports the template's refusal
            return None
        after = self.render_chat(transcript + new)
        cut = marked.rfind(_MARK)
        closing = marked[cut + len(_MARK):] if cut >= 0 else None  # the template's text after a reply
        if closing is None or not before.endswith(reply + closing) or not after.startswith(before):
            return None
        ids = self.encode_text(closing + after[len(before):], param="messages", add_special_tokens=False)
        if ids and context[-1] == ids[0]:
            ids = ids[1:]  # the reply ended with the end-of-turn token the closing starts with (its EOS)
        self.check_len(len(context) + len(ids), "messages")
        return context + ids

    def encode_append(self, context: list[int], transcript: list[dict], new: list[dict]) -> list[int]:
        """``encode_continuation``, or the whole conversation rendered where it cannot apply."""
        ids = self.encode_continuation(context, transcript, new)
        return ids if ids is not None else self.encode_chat(transcript + new)

    def encode_text(self, text: str, param: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; raises ContextLengthExceededError when it cannot leave a
        token to generate, InvalidRequestError when it cannot be tokenized at all."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"{param} must be a string", param, code="invalid_type")
        if len(text) > self.max_prompt_chars:
            raise ContextLengthExceededError(
                f"the prompt has {len(text)} characters; this model's context of {self.max_model_len} tokens "
                f"cannot hold more than {self.max_prompt_chars} (at most {self.longest_token} characters per "
                f"token, x{NORMALIZATION_MARGIN} for Unicode normalization)", param=param)
        try:
            n, ids = self._encode(text, add_special_tokens)
        except Exception as e:  # e.g. a lone surrogate: the tokenizer only takes valid Unicode
            why = _why(e, text)
        else:
            self.check_len(n, param)
            return ids
        raise InvalidRequestError(f"the {param} could not be tokenized: {why}", param, code="invalid_value")

    def _encode(self, text: str, add_special_tokens: bool) -> tuple[int, list[int] | None]:
        """(token count, ids); ids are None, never built, when they cannot fit. The Rust
        encoding (megabytes for a long text) dies with this frame, before any error is raised."""
        if self._rust is None:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return len(ids), ids
        enc = self._rust.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        n = len(enc)
        return n, (enc.ids if n < self.max_model_len else None)

    def check_len(self, n: int, param: str) -> None:
        """A prompt of ``n`` tokens must leave at least one to generate."""
        if n >= self.max_model_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{n} (at least one token must be left to generate)", param=param)


def _why(e: BaseException, text: str) -> str:
    """A short reason for the client; a lone surrogate gets a plain sentence, not the binding's TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as u:
        return f"the text is not valid Unicode (a lone surrogate U+{ord(text[u.start]):04X} at index {u.start})"
    return f"{type(e).__name__}: {str(e)[:200]}"
