"""Pensieve engine: stateful LLM serving with a paged KV cache kept between turns."""
from .config import EngineConfig
from .engine import LLMEngine
from .errors import (CheckpointError, ContextLengthExceededError, InvalidRequestError, PensieveError,
                     SessionBusyError, UnknownSessionError)
from .request import RequestOutput
from .sampling import SamplingParams

__all__ = [
    "EngineConfig", "LLMEngine", "SamplingParams", "RequestOutput", "PensieveError", "InvalidRequestError",
    "ContextLengthExceededError", "SessionBusyError", "UnknownSessionError", "CheckpointError",
]
