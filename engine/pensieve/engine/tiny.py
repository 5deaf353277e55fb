"""Tiny random checkpoints for tests and the demo, made on the spot.

Weights come from a fixed seed through transformers' own model classes (so the
folder is a genuine Hugging Face checkpoint), the tokenizer is a byte-level BPE
trained here with the `tokenizers` library, and a chat template is attached.

    python -m pensieve.engine tiny --family llama --out /tmp/tiny-llama
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
FAMILIES = ("llama", "qwen2", "mistral", "opt")

_WORDS = (
    "the a cache keeps each conversation between turns so new tokens only are computed memory "
    "GPU CPU tier block chunk session history model serve request prompt answer question user "
    "assistant hello world chat stateful stateless attention key value layer copy swap evict "
    "retention idle leading drop recompute batch schedule decode prefill kernel paged table "
    "what is how does why can you tell me about please explain thanks good great yes no maybe "
    "cluster pod node operator router endpoint metric scale replica deployment service time"
).split()


def _corpus(seed: int, lines: int = 600) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    out += ["0 1 2 3 4 5 6 7 8 9 10 100 2024", "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z"]
    return out


def train_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                   unk_token="<unk>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def _hf_config(family: str, vocab_size: int, tok, **overrides):
    import transformers as T

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, **ids)
    if family == "opt":
        cfg = T.OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          ffn_dim=128, max_position_embeddings=1024, word_embed_proj_dim=64, **ids)
    elif family == "llama":
        cfg = T.LlamaConfig(**common, num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5,
                            tie_word_embeddings=False)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**common, num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6,
                            tie_word_embeddings=True)
    elif family == "mistral":
        cfg = T.MistralConfig(**common, num_key_value_heads=1, intermediate_size=128, sliding_window=None,
                              tie_word_embeddings=False)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0,
                         dtype: str = "float32", **config_overrides) -> Path:
    """Write a complete tiny checkpoint folder; returns its path. Same seed, same bytes of weights."""
    import torch
    import transformers as T

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out, seed=seed)
    vocab = len(tok)
    cfg = _hf_config(family, vocab, tok, **config_overrides)
    cls = {"opt": T.OPTForCausalLM, "llama": T.LlamaForCausalLM, "qwen2": T.Qwen2ForCausalLM,
           "mistral": T.MistralForCausalLM}[family]
    torch.manual_seed(seed)
    model = cls(cfg)
    # Random init leaves norms at 1 and biases at 0; perturb them so parity tests see them.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    gen_cfg = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out
