"""Sampling parameters (validated at the boundary) and the batched sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import is_int, is_number
from .errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    """What one request asks of the sampler. Invalid values raise InvalidRequestError."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # Text is made where detokenizer.py says: False asks the engine for token ids only (the HTTP
    # server sends False and no stop strings, and makes text and finds stop strings itself); stop
    # strings given to the engine make it produce text anyway.
    detokenize: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)

    def __post_init__(self) -> None:
        """The one validation of sampling parameters (the HTTP protocol relies on it: codes
        ``invalid_type`` and ``invalid_value`` reach the client as they are)."""
        def fail(message: str, param: str, code: str = "invalid_value"):
            raise InvalidRequestError(message, param, code)

        if not is_int(self.max_tokens):
            fail(f"max_tokens must be an integer, got {self.max_tokens!r}", "max_tokens", "invalid_type")
        if self.max_tokens <= 0:
            fail(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            fail(f"temperature must be a number in [0, 100], got {self.temperature!r}", "temperature")
        if not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not is_int(self.top_k) or self.top_k < -1:
            fail(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}", "top_k")
        if self.seed is not None and not is_int(self.seed):
            fail(f"seed must be an integer, got {self.seed!r}", "seed", "invalid_type")
        self.stop = _check_stop(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be a list of non-negative integers", "stop_token_ids", "invalid_type")
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _check_stop(stop) -> list[str]:
    """None, a string or a list of strings -> a list of at most MAX_STOP_STRINGS non-empty strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop must be a non-empty string or a list of non-empty strings", "stop",
                                  "invalid_type")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_LEN for s in stop):
        raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most "
                                  f"{MAX_STOP_STRING_LEN} characters, got {len(stop)}", "stop", "invalid_value")
    return list(stop)


class Sampler:
    """Turns the last-position logits of a batch into one token per row, on the device.

    Greedy rows take the argmax. Other rows apply temperature, top-k and top-p
    (batched tensor operations) and then race exponentials: the token is
    argmax(p / E) with E = -log(u), which draws from p. The uniforms u come from
    a counter-based hash of (the request's seed, the output position, the token
    id), so a seeded request gives the same tokens whatever it is batched with,
    on any device, and no request needs a generator of its own: there is no
    per-request loop on the host.
    """

    ROWS_PER_CHUNK = 16  # rows hashed at once: bounds the [rows, vocab] int64 temporaries

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                 positions: list[int]) -> list[int]:
        return self.sample(logits, params, seeds, positions).tolist()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
               positions: list[int]) -> torch.Tensor:
        """One token id per row, as an int64 tensor on the logits' device (no host sync).
        ``seeds[i]``/``positions[i]``: row i's request seed and the index of the output token drawn."""
        logits = apply_logit_bias(logits.float(), [p.logit_bias for p in params])
        tokens = torch.argmax(logits, dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:  # greedy batches (the common serving case) stop here
            return tokens
        dev = logits.device
        rows = torch.tensor(random_rows, device=dev)
        sub = logits.index_select(0, rows)
        temps = torch.tensor([params[i].temperature for i in random_rows], device=dev)
        sub = sub / temps.unsqueeze(1)
        sub = _apply_top_k(sub, [params[i].top_k for i in random_rows])
        sub = _apply_top_p(sub, [params[i].top_p for i in random_rows])
        probs = torch.softmax(sub, dim=-1)
        seed_t = torch.tensor([seeds[i] for i in random_rows], dtype=torch.int64, device=dev)
        pos_t = torch.tensor([positions[i] for i in random_rows], dtype=torch.int64, device=dev)
        drawn = []
        for c in range(0, len(random_rows), self.ROWS_PER_CHUNK):
            part = slice(c, c + self.ROWS_PER_CHUNK)
            u = uniform_noise(seed_t[part], pos_t[part], probs.shape[1])
            drawn.append(torch.argmax(probs[part] / -torch.log(u), dim=-1))
        tokens[rows] = torch.cat(drawn)
        return tokens


def _signed64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


# splitmix64's constants, as int64 (torch multiplies int64 modulo 2^64)
_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 [rows, vocab] in (0, 1): splitmix64 of (seed, position, token id). The same
    numbers on every device and in every batch."""
    ids = torch.arange(vocab, dtype=torch.int64, device=seeds.device)
    z = seeds[:, None] * _GOLDEN + positions[:, None] * _MIX1 + ids[None, :] + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return ((_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24)))


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
    """Add each row's ``{token id: bias}`` to its logits (before temperature, like OpenAI).

    One scatter for the whole batch; the Python work is over the (at most 300)
    entries per row, never over the vocabulary. Returns ``logits`` itself when
    no row has a bias, a new tensor otherwise (the caller's is left untouched).
    """
    if not any(biases):
        return logits
    rows = [i for i, b in enumerate(biases) for _ in b]
    cols = [t for b in biases for t in b]
    vals = [v for b in biases for v in b.values()]
    # Built on the host and copied without blocking: no wait for the GPU's queued work.
    dev = logits.device
    index = (torch.tensor(rows).to(dev, non_blocking=True), torch.tensor(cols).to(dev, non_blocking=True))
    values = torch.tensor(vals, dtype=logits.dtype).to(dev, non_blocking=True)
    return logits.index_put(index, values, accumulate=True)


def _check_logit_bias(bias) -> dict[int, float]:
    """OpenAI's logit_bias: at most 300 token ids (non-negative integers), each to a bias in [-100, 100].
    The engine checks the ids against its vocabulary."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise InvalidRequestError("logit_bias must map token ids to numbers", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequestError(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}",
                                  "logit_bias")
    out = {}
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidRequestError(f"logit_bias keys must be token ids (non-negative integers), got {token!r}",
                                      "logit_bias")
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or value != value
                or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise InvalidRequestError(f"logit_bias values must be numbers in [-100, 100], got {value!r} "
                                      f"for token {token}", "logit_bias")
        out[token] = float(value)
    return out


def _apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_ks]
    if all(k == vocab for k in ks):
        return logits
    k_t = torch.tensor(ks, device=logits.device)
    sorted_desc = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k_t - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    p_t = torch.tensor(top_ps, device=logits.device, dtype=torch.float32)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first token always stays).
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= p_t.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
