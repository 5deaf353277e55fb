"""Incremental detokenization: text deltas without decoding the whole output each step."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a short window of tokens per step.

    ``prefix`` tokens give the decoder context (byte-level and sentencepiece
    tokenizers render a token differently after a space); a delta is released
    only once it does not end in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prefix_offset = max(0, len(prompt_ids) - 6)
        self.read_offset = len(prompt_ids)

    def step(self, token_ids: list[int]) -> str:
        decode = self.tokenizer.decode
        prefix = decode(token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(token_ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
            return full[len(prefix):]
        return ""
