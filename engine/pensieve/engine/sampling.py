"""Sampling parameters (validated at the boundary) and the batched sampler."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import is_int, is_number
from .errors import InvalidRequestError
from .pinned import PinnedPair

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

    def __init__(self, staging: tuple[PinnedPair, PinnedPair] | None = None):
        """``staging``: page-locked (int64, float32) buffers for the sampled rows' parameters on CUDA.
        Without them a tensor made from a host list is copied synchronously, so a step with a
        temperature row would make the host wait for the device before it could launch the next."""
        self.staging = staging

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
        n, vocab = len(random_rows), logits.shape[1]
        ks = [k if 0 < k < vocab else vocab for k in (params[i].top_k for i in random_rows)]
        ps = [params[i].top_p for i in random_rows]
        # one copy per dtype: rows, top-k, seeds, positions; temperatures, top-p
        ints = self._upload([*random_rows, *ks, *(seeds[i] for i in random_rows),
                             *(positions[i] for i in random_rows)], torch.int64, logits.device)
        floats = self._upload([*(params[i].temperature for i in random_rows), *ps], torch.float32, logits.device)
        rows, k_t, seed_t, pos_t = ints.view(4, n)
        temps, p_t = floats.view(2, n)
        sub = logits.index_select(0, rows) / temps.unsqueeze(1)
        if any(k < vocab for k in ks):
            sub = _apply_top_k(sub, k_t)
        if any(p < 1.0 for p in ps):
            sub = _apply_top_p(sub, p_t)
        probs = torch.softmax(sub, dim=-1)
        drawn = []
        for c in range(0, n, self.ROWS_PER_CHUNK):
            part = slice(c, c + self.ROWS_PER_CHUNK)
            u = uniform_noise(seed_t[part], pos_t[part], probs.shape[1])
            drawn.append(torch.argmax(probs[part] / -torch.log(u), dim=-1))
        tokens[rows] = torch.cat(drawn)
        return tokens

    def warm_up(self, vocab: int, max_rows: int, device: torch.device) -> None:
        """Sample temperature, top-k and top-p rows at every row count up to ``max_rows``, so that
        serving launches no kernel for the first time (a first launch waits for the device)."""
        logits = torch.zeros(max_rows, vocab, device=device)
        params = [SamplingParams(temperature=0.7, top_k=40, top_p=0.9)] * max_rows
        rows = list(range(max_rows))
        for m in range(1, max_rows + 1):
            self.sample(logits[:m], params[:m], rows[:m], rows[:m])
            if device.type == "cuda":  # the staging buffers are reused every other call, as steps do
                torch.cuda.synchronize(device)

    def _upload(self, values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.staging is None or device.type != "cuda":
            return torch.tensor(values, dtype=dtype, device=device)
        host = self.staging[0 if dtype == torch.int64 else 1].next(len(values))
        host.copy_(torch.tensor(values, dtype=dtype))
        return host.to(device, non_blocking=True)


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


def _apply_top_k(logits: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``ks[row]`` largest logits (1 <= k <= vocab; ties with the k-th stay)."""
    sorted_desc = torch.sort(logits, dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (ks - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of top tokens whose mass reaches ``ps[row]``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first token always stays).
    drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= ps.unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
