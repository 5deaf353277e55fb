"""PromptEncoder (the one path from text to token ids) and logit_bias on the sampler."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from pensieve.engine.errors import ContextLengthExceededError, InvalidRequestError
from pensieve.engine.prompt import NORMALIZATION_MARGIN, PromptEncoder
from pensieve.engine.sampling import Sampler, SamplingParams, apply_logit_bias

TEXTS = ["hello", " the cache keeps sessions\n\nnext turn", "naïve café — 東京 🙂", "<|im_start|>user x",
         "a  b\tc\r\n"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "opt"])
def test_encoder_matches_transformers(tiny_checkpoint, family):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(family))
    enc = PromptEncoder(tok, 1024)
    for text in TEXTS:
        assert enc.encode_text(text) == tok.encode(text, add_special_tokens=True), text
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert enc.encode_chat(messages) == tok.encode(rendered, add_special_tokens=False)


def test_encoder_bounds_and_errors(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    enc = PromptEncoder(tok, 64)
    longest = max(len(t) for t in tok.get_vocab())
    assert enc.max_prompt_chars == 64 * longest * NORMALIZATION_MARGIN
    with pytest.raises(ContextLengthExceededError, match="characters"):
        enc.encode_text("x" * (enc.max_prompt_chars + 1))
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 64 tokens"):
        enc.encode_text("x " * 100)
    with pytest.raises(InvalidRequestError, match="lone surrogate U\\+D800 at index 1") as e:
        enc.encode_text("a\ud800b")
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="lone surrogate") as e:
        enc.encode_chat([{"role": "user", "content": "x\udc00"}])
    assert e.value.param == "messages"


def test_apply_logit_bias_is_one_batched_add():
    logits = torch.randn(3, 50)
    before = logits.clone()
    out = apply_logit_bias(logits, [{3: 100.0, 7: -5.5}, {}, {49: -100.0}])
    assert torch.equal(logits, before)  # the caller's tensor is untouched
    expected = before.clone()
    expected[0, 3] += 100.0
    expected[0, 7] -= 5.5
    expected[2, 49] -= 100.0
    assert torch.equal(out, expected)
    assert apply_logit_bias(logits, [{}, {}, {}]) is logits
    tokens = Sampler()(logits, [SamplingParams(temperature=0, logit_bias={11: 100}), SamplingParams(temperature=0),
                                SamplingParams(temperature=1.0, seed=1, logit_bias={5: 100})], [0, 0, 1], [0, 0, 0])
    assert tokens[0] == 11 and tokens[1] == int(torch.argmax(before[1])) and tokens[2] == 5


@pytest.mark.parametrize("bias", [{1: 101}, {1: -100.5}, {1: float("nan")}, {-1: 1}, {"1": 1}, {1: True},
                                  {i: 1 for i in range(301)}, [1, 2]])
def test_logit_bias_validation(bias):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_continuation_extends_the_sessions_tokens(tiny_checkpoint, family):
    """An append-mode turn's prompt is the session's tokens plus the template's text for the new
    messages: the same ids as re-rendering the transcript when the reply's ids are its canonical
    encoding; the model's own ids, kept as they are, when they are not."""
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint(family))
    enc = PromptEncoder(tok, 1024)
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    reply, new = "hello world", [{"role": "user", "content": "more please"}]
    transcript = first + [{"role": "assistant", "content": reply}]
    end = tok.convert_tokens_to_ids("<|end|>")
    canonical = enc.encode_chat(first) + tok.encode(reply, add_special_tokens=False)
    for context in (canonical + [end], canonical):  # ended at its end-of-turn token, or at max_tokens
        assert enc.encode_continuation(context, transcript, new) == enc.encode_chat(transcript + new)
    # ids the text would not encode back to (one per character): kept, so the whole context is a prefix
    own = enc.encode_chat(first) + [tok.convert_tokens_to_ids(c) for c in "hello"] + \
        tok.encode(" world", add_special_tokens=False) + [end]
    assert own[:-1] != canonical
    ids = enc.encode_continuation(own, transcript, new)
    assert ids[:len(own)] == own
    assert tok.decode(ids) == tok.decode(enc.encode_chat(transcript + new))


def test_continuation_falls_back_where_the_template_rewrites_the_past(tiny_checkpoint):
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    enc = PromptEncoder(tok, 1024)
    transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello "}]
    context = enc.encode_chat(transcript[:1]) + tok.encode(" hello ", add_special_tokens=False)
    new = [{"role": "user", "content": "and?"}]
    assert enc.encode_continuation(context, transcript, new) is not None
    assert enc.encode_continuation(context, transcript[:1], new) is None  # no reply at the end
    assert enc.encode_continuation([], transcript, new) is None
    base = tok.chat_template
    # a template that trims the reply's text: its rendering does not show the reply verbatim
    tok.chat_template = base.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    assert enc.encode_continuation(context, transcript, new) is None
    # a template that renders only the last two messages: the past is not a prefix of the next turn
    tok.chat_template = base.replace("{% for message in messages %}", "{% for message in messages[-2:] %}")
    assert enc.encode_continuation(context, transcript, new) is None
    tok.chat_template = base
    small = PromptEncoder(tok, len(context) + 3)
    with pytest.raises(ContextLengthExceededError):
        small.encode_continuation(context, transcript, new)
