"""Requests and sessions: the engine's typed state."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Session:
    """A conversation's cached context, kept between turns.

    ``token_ids[:num_cached]`` have their keys/values in ``block_ids`` (GPU
    tier). While a turn runs, the blocks belong to that request
    (``active_request`` is set) and the session holds none.
    """

    session_id: str
    owner: str | None = None
    token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    last_active: float = field(default_factory=time.monotonic)
    active_request: str | None = None
    num_turns: int = 0

    @property
    def num_cached(self) -> int:
        return len(self.token_ids)


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
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the session's cache at admission
    admitted: bool = False
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    detokenizer: object | None = None
    output_text: str = ""
    emitted_text_len: int = 0
    first_token_time: float | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV still has to be computed before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens


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
