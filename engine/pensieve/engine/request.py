"""Requests and sessions: the engine's typed state."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Chunk:
    """Where one block-sized piece of a session's context lives.

    gpu and cpu are block ids in each tier's pool, or None. Both set: copied
    ahead of time to the CPU, still valid on the GPU until that slot is
    reclaimed. Neither set: dropped, to be recomputed from the token ids.
    """

    __slots__ = ("gpu", "cpu")

    def __init__(self, gpu: int | None = None, cpu: int | None = None):
        self.gpu, self.cpu = gpu, cpu

    @property
    def dropped(self) -> bool:
        return self.gpu is None and self.cpu is None

    def __repr__(self) -> str:
        return f"Chunk(gpu={self.gpu}, cpu={self.cpu})"


class SessionKey(NamedTuple):
    """A session's identity in the engine: the API key's identity (None without keys) and the id.
    Two keys that use the same id have two unrelated sessions."""

    owner: str | None
    session_id: str


@dataclass(eq=False)
class Session:
    """A conversation's context, kept between turns.

    ``token_ids`` is the whole context known to the cache; ``chunks[i]``
    covers tokens ``[i*block_size, (i+1)*block_size)``. Oldest first, the
    chunks are dropped | in CPU | in GPU (eviction takes leading chunks first,
    which keeps that order). While a turn runs, its request owns the GPU
    blocks (``active_request`` is set) and the session holds no chunks.
    """

    session_id: str
    owner: str | None = None
    token_ids: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)
    active_request: str | None = None
    num_turns: int = 0
    internal: bool = False  # made by the engine to hold a suspended request's context

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.owner, self.session_id)

    @property
    def num_cached(self) -> int:
        return len(self.token_ids)

    @property
    def block_ids(self) -> list[int]:
        """GPU blocks held (for inspection)."""
        return [c.gpu for c in self.chunks if c.gpu is not None]

    @property
    def cpu_block_ids(self) -> list[int]:
        return [c.cpu for c in self.chunks if c.cpu is not None]


@dataclass(eq=False)
class Request:
    """One generation. ``token_ids`` is prompt + output so far; the first
    ``num_computed_tokens`` of them have their KV in ``block_ids``."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int
    session: Session | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    # CPU-tier copies of leading blocks, aligned with block_ids (None: no copy). A copy is kept only
    # for a block whose tokens the request cannot change (a full block of the context it was
    # admitted with), so that the session's next eviction of that chunk needs no copy.
    cpu_copies: list[int | None] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the session's cache at admission (GPU or CPU)
    # Where the prompt's KV came from at admission: gpu, cpu (cached), recomputed, new (sums to the
    # prompt). "recomputed" covers dropped chunks and the prefix the caller's session store says the
    # conversation already had (``stored_context``) that this engine no longer (or never) held.
    context_sources: dict[str, int] = field(default_factory=dict)
    stored_context: int = 0  # leading prompt tokens known to the session store (add_request's ``history``)
    # Dropped leading tokens being recomputed as a second query segment: positions
    # [recompute_pos, recompute_end) still lack their KV; [recompute_end, num_computed_tokens) have it.
    recompute_pos: int = 0
    recompute_end: int = 0
    admitted: bool = False
    suspended: bool = False
    finish_reason: str | None = None
    seed: int = 0  # of the sampler's noise (the request's own, or drawn at random when it gave none)
    text: object | None = None  # its TextStream when the engine makes text (detokenizer.py says who does)
    first_token_time: float | None = None
    # Trailing placeholders in token_ids: tokens sampled by a step still running
    # (asynchronous scheduling). The scheduler counts them as known tokens.
    num_pending: int = 0

    @property
    def num_output_tokens(self) -> int:
        """Output tokens the host has (placeholders excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV still has to be computed before the next sample."""
        return self.recompute_end - self.recompute_pos + len(self.token_ids) - self.num_computed_tokens

    @property
    def num_valid_tokens(self) -> int:
        """Leading tokens whose KV is in the request's blocks (contiguous from position 0)."""
        if self.recompute_pos < self.recompute_end:
            return self.recompute_pos
        return self.num_computed_tokens


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed to clients)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    session_id: str | None = None
    context_sources: dict[str, int] = field(default_factory=dict)  # see Request.context_sources

    @property
    def num_recomputed_tokens(self) -> int:
        """Context this turn recomputed because the cache no longer (or never) held it."""
        return self.context_sources.get("recomputed", 0)
