"""GGUF loading on tiny checkpoints written here the way llama.cpp lays them out: exact weights
in F32 (q/k permutation undone), each supported block format against an independent reference,
the tokenizer and chat template from metadata, clear errors, and the metadata cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pensieve.engine import EngineConfig, LLMEngine, SamplingParams
from pensieve.engine.errors import CheckpointError

from gguf_helpers import hf_state, reference_dequantize, write_gguf

KW = dict(device="cpu", dtype="float32", num_gpu_blocks=64, num_cpu_blocks=8, block_size=16)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PENSIEVE_CACHE", str(tmp_path / "cache"))


def _engine(model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), **KW))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f32_gguf_equals_the_hf_checkpoint(tiny_checkpoint, tmp_path, family):
    """Llama's q/k rows are permuted in the file (qwen2's are not): loading must undo it exactly."""
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    write_gguf(tiny_checkpoint(family), folder / "tiny.gguf")
    hf, ours = _engine(tiny_checkpoint(family)), _engine(folder)  # a folder holding one .gguf
    a, b = dict(hf.runner.model.named_parameters()), dict(ours.runner.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    messages = [{"role": "user", "content": "What does the cache keep between turns?"}]
    prompt = hf.encode_chat(messages)
    assert ours.encode_chat(messages) == prompt
    assert ours.eos_token_ids == hf.eos_token_ids
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert ours.generate([prompt], params) == hf.generate([prompt], params)
    assert ours.served_model_name == "gguf-folder"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_quantized_weights_dequantized_like_the_block_format(tiny_checkpoint, tmp_path, qtype):
    import gguf

    model_dir = tiny_checkpoint("llama")
    path = write_gguf(model_dir, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    engine = _engine(path)
    assert engine.served_model_name == f"tiny-{qtype}"
    model = engine.runner.model
    layer = model.layers[1]
    state = hf_state(model_dir)
    checked = {
        "model.layers.1.self_attn.q_proj.weight": layer.qkv_proj.weight[:layer.q_size],
        "model.layers.1.self_attn.k_proj.weight": layer.qkv_proj.weight[layer.q_size:layer.q_size + layer.kv_size],
        "model.layers.1.mlp.down_proj.weight": layer.down_proj.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for name, ours in checked.items():
        w = state[name].astype(np.float32)
        # Blocks run along rows, so quantizing the unpermuted rows gives the same values.
        if qtype == "F16":
            expected = torch.from_numpy(w.astype(np.float16).astype(np.float32))
        elif qtype == "BF16":
            expected = torch.from_numpy(w).to(torch.bfloat16).float()
        else:
            raw = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, qtype))
            expected = reference_dequantize(raw, qtype, w.shape[1])
        assert torch.equal(ours.detach(), expected), name
        # and the format really is lossy but close (not, say, zeros)
        err = (ours.detach() - torch.from_numpy(w)).abs().max().item()
        assert err < {"Q4_0": 0.02, "Q4_1": 0.02, "Q8_0": 1e-3, "F16": 1e-4, "BF16": 1e-3}[qtype], (name, err)
    out = engine.generate([[1, 5, 9, 20]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out) == 4


def test_unsupported_quant_type_names_the_tensor(tiny_checkpoint, tmp_path):
    raw = np.zeros((4, 2 * 40), dtype=np.uint8)  # two Q8_1 blocks (40 bytes each) a row: 64 weights
    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "q81.gguf", raw_tensors={"blk.0.attn_v.bias": (raw, "Q8_1")})
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_v.bias' has quantization type Q8_1"):
        _engine(path)


def test_unknown_tensor_is_named(tiny_checkpoint, tmp_path):
    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "extra.gguf",
                      extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor 'blk.0.attn_q_norm.weight' has no counterpart"):
        _engine(path)


def test_unsupported_architecture_names_the_key(tiny_checkpoint, tmp_path):
    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(CheckpointError, match=r"general.architecture 'phi3' is not supported; supported: \['llama', 'qwen2'\]"):
        _engine(path)


def test_missing_metadata_key_is_named(tiny_checkpoint, tmp_path):
    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "nokey.gguf", skip_keys=("feed_forward_length",))
    with pytest.raises(CheckpointError, match=r"metadata key 'llama.feed_forward_length' is missing"):
        _engine(path)


def test_llama3_rope_factors_are_refused(tiny_checkpoint, tmp_path):
    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "rf.gguf",
                      extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor 'rope_freqs.weight'"):
        _engine(path)


def test_folder_with_two_gguf_files_and_non_gguf_files(tiny_checkpoint, tmp_path):
    write_gguf(tiny_checkpoint("llama"), tmp_path / "a.gguf")
    write_gguf(tiny_checkpoint("llama"), tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        _engine(tmp_path)
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        _engine(junk)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        _engine(fake)


def test_metadata_converted_once_and_cached(tiny_checkpoint, tmp_path, monkeypatch):
    from pensieve.engine import gguf_checkpoint

    path = write_gguf(tiny_checkpoint("llama"), tmp_path / "c.gguf")
    first = gguf_checkpoint.converted_dir(path)
    assert first.parent == tmp_path / "cache" / "models"
    assert {"config.json", "tokenizer.json"} <= {p.name for p in first.iterdir()}

    def fail(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_checkpoint, "build_tokenizer", fail)
    assert gguf_checkpoint.converted_dir(path) == first
    path.touch()  # a changed file (mtime) is converted anew
    monkeypatch.undo()
    monkeypatch.setenv("PENSIEVE_CACHE", str(tmp_path / "cache"))
    assert gguf_checkpoint.converted_dir(path) != first


def test_unpermute_inverts_llama_cpp_permutation():
    from pensieve.engine.gguf_checkpoint import unpermute_rotary_rows

    from gguf_helpers import permute_rotary_rows

    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    assert torch.equal(unpermute_rotary_rows(torch.from_numpy(permute_rotary_rows(w, 3)), 3), torch.from_numpy(w))
    assert not np.array_equal(permute_rotary_rows(w, 3), w)
