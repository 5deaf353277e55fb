"""Request validation and OpenAI-shaped errors and responses.

Every client error becomes ``APIError`` with the contract's status code and
``{"error": {"message", "type", "param", "code"}}``. Validation happens here,
before anything reaches the engine, except what ``SamplingParams`` owns (stop
strings, the sampler's ranges), whose errors pass through with their codes; the engine's own checks (context length,
session ownership) come back as its typed errors and are mapped by
``from_engine_error``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import (ContextLengthExceededError, EngineDeadError, InvalidRequestError, PensieveError, QueueFullError,
                      SessionBusyError, UnknownSessionError)
from ..checks import is_int, is_number
from ..sampling import MAX_LOGIT_BIAS_ENTRIES, SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")
SESSION_MODES = ("full", "append")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def session_not_found(session_id: str) -> APIError:
    return APIError(404, f"session {session_id!r} not found", param="session_id", code="session_not_found")


def from_engine_error(e: BaseException, session_id: str | None = None) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running ({e}); retry on another replica", type="service_unavailable",
                        code="engine_unavailable", headers={"Retry-After": "1"})
    if isinstance(e, QueueFullError):
        return APIError(429, str(e) + "; retry later", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, SessionBusyError):
        return APIError(409, e.message, param="session_id", code="session_busy")
    if isinstance(e, ContextLengthExceededError):
        return APIError(400, e.message, param=e.param or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return APIError(400, e.message, param=e.param, code=e.code)
    if isinstance(e, UnknownSessionError):
        return session_not_found(e.session_id)
    if isinstance(e, PensieveError):
        return APIError(400, str(e))
    return APIError(500, "internal error", type="server_error", code="internal_error")


def parse_json_body(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding") from None
    if not text.strip():
        raise bad("request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------ field readers
def get_int(body: dict, name: str, default=None, lo=None, hi=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not is_int(v):
        raise bad(f"{name} must be an integer, got {type(v).__name__}", name, "invalid_type")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}", name, "invalid_value")
    return v


def get_num(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if not is_number(v):
        raise bad(f"{name} must be a number, got {type(v).__name__}", name, "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name, "invalid_value")
    return float(v)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be a boolean, got {type(v).__name__}", name, "invalid_type")
    return v


def get_str(body: dict, name: str, default=None, choices=None):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(f"{name} must be a string, got {type(v).__name__}", name, "invalid_type")
    if choices is not None and v not in choices:
        raise bad(f"{name} must be one of {list(choices)}, got {v!r}", name, "invalid_value")
    return v


def check_session_id(value, max_len: int, param: str = "session_id") -> str:
    if not isinstance(value, str):
        raise bad(f"{param} must be a string", param, "invalid_session_id")
    if not value:
        raise bad(f"{param} must not be empty", param, "invalid_session_id")
    if len(value) > max_len:
        raise bad(f"{param} is longer than {max_len} characters", param, "invalid_session_id")
    if not all(0x21 <= ord(c) <= 0x7e for c in value):
        raise bad(f"{param} may only hold printable ASCII characters without spaces", param, "invalid_session_id")
    return value


# ------------------------------------------------------------------ generation requests
@dataclass
class GenerationRequest:
    kind: str                     # "chat" or "completion"
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: list[dict] | None = None   # chat: the messages of this request
    prompt: str | list[int] | None = None  # completion
    session_id: str | None = None
    session_mode: str = "full"
    extra: dict = field(default_factory=dict)


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": string}} "
                          "(only text is supported)", f"messages[{i}].content", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
              "invalid_type")


def parse_messages(raw, allow_empty: bool = False) -> list[dict]:
    if raw is None:
        raise bad("missing required field 'messages'", "messages", "missing_required_parameter")
    if not isinstance(raw, list):
        raise bad("messages must be a list of {role, content} objects", "messages", "invalid_type")
    if not raw and not allow_empty:
        raise bad("messages must not be empty", "messages", "invalid_value")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"messages[{i}].role is required and must be a string", f"messages[{i}].role",
                      "invalid_type" if "role" in m else "missing_required_parameter")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}", f"messages[{i}].role",
                      "invalid_value")
        if "content" not in m:
            raise bad(f"messages[{i}].content is required", f"messages[{i}].content", "missing_required_parameter")
        content = "" if m["content"] is None and role == "assistant" else _content_text(m["content"], i)
        out.append({"role": role, "content": content})
    return out


def _common(body: dict, kind: str, server_cfg) -> dict:
    model = body.get("model")
    if model is None:
        raise bad("missing required field 'model'", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model must be a string", "model", "invalid_type")
    n = get_int(body, "n", 1, lo=1)
    if n != 1:
        raise bad("only n=1 is supported", "n", "unsupported_value")
    best_of = get_int(body, "best_of", 1, lo=1)
    if best_of != 1:
        raise bad("only best_of=1 is supported", "best_of", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if get_num(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise bad(f"{name} is not supported (only 0)", name, "unsupported_value")
    if kind == "chat":
        if get_bool(body, "logprobs", False):
            raise bad("logprobs are not supported", "logprobs", "unsupported_value")
    elif body.get("logprobs") is not None:
        raise bad("logprobs are not supported", "logprobs", "unsupported_value")
    if body.get("tools") or body.get("functions"):
        raise bad("tools are not supported", "tools", "unsupported_value")
    _check_response_format(body.get("response_format"))
    logit_bias = _logit_bias(body.get("logit_bias"))
    max_tokens = get_int(body, "max_completion_tokens", None, lo=1) if kind == "chat" else None
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, lo=1)
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("stream_options must be an object", "stream_options", "invalid_type")
        include_usage = get_bool(opts, "include_usage", False)
    temperature = get_num(body, "temperature", 1.0, 0.0, 2.0)
    top_p = get_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = get_int(body, "top_k", -1, lo=-1)
    seed = get_int(body, "seed", None, lo=-(2 ** 63), hi=2 ** 63 - 1)
    ignore_eos = get_bool(body, "ignore_eos", False)
    if max_tokens is None:
        max_tokens = server_cfg.default_max_tokens or (1 << 30)  # the engine clamps to the context left
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=body.get("stop"), ignore_eos=ignore_eos, logit_bias=logit_bias)
    except InvalidRequestError as e:  # stop strings and logit_bias values are checked there only
        raise bad(e.message, e.param, e.code or "invalid_value") from None
    session_id = body.get("session_id")
    if session_id is not None:
        session_id = check_session_id(session_id, server_cfg.max_session_id_len)
    session_mode = get_str(body, "session_mode", "full", SESSION_MODES)
    return dict(model=model, params=params, stream=stream, include_usage=include_usage,
                session_id=session_id, session_mode=session_mode)


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _check_response_format(value) -> None:
    """``text`` is what the engine does anyway. Structured output (``json_object``,
    ``json_schema``) is refused rather than silently ignored: it needs a grammar
    matcher stepping with every sampled token, which the engine does not have."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad("response_format must be an object such as {\"type\": \"text\"}", "response_format",
                  "invalid_type")
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad(f"response_format.type must be one of {list(RESPONSE_FORMATS)}, got {kind!r}", "response_format",
                  "invalid_value")
    if kind != "text":
        raise bad(f"response_format {kind!r} (structured output) is not supported; only 'text'",
                  "response_format", "unsupported_value")


def _logit_bias(value) -> dict[int, float]:
    """JSON object keys are strings: {"50256": -100} -> {50256: -100.0}; the rest is
    checked by SamplingParams (size, range) and the engine (vocabulary)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias must be an object mapping token ids to numbers in [-100, 100]", "logit_bias",
                  "invalid_type")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}", "logit_bias",
                  "invalid_value")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise bad(f"logit_bias keys must be token ids (decimal integers), got {key!r}", "logit_bias",
                      "invalid_value")
        out[int(key)] = bias
    return out


def parse_chat(body: dict, server_cfg) -> GenerationRequest:
    common = _common(body, "chat", server_cfg)
    messages = parse_messages(body.get("messages"))
    return GenerationRequest(kind="chat", messages=messages, **common)


def parse_completion(body: dict, server_cfg) -> GenerationRequest:
    common = _common(body, "completion", server_cfg)
    if common["session_mode"] != "full":
        raise bad("session_mode 'append' is only supported by /v1/chat/completions", "session_mode",
                  "unsupported_value")
    if get_bool(body, "echo", False):
        raise bad("echo is not supported", "echo", "unsupported_value")
    if body.get("suffix") is not None:
        raise bad("suffix is not supported", "suffix", "unsupported_value")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("missing required field 'prompt'", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt must not be empty", "prompt", "invalid_value")
    elif isinstance(prompt, list):
        if not prompt or not all(is_int(t) for t in prompt):
            raise bad("prompt must be a string, or a non-empty list of token ids (batches of several prompts are "
                      "not supported)", "prompt", "invalid_type")
    else:
        raise bad("prompt must be a string or a list of token ids", "prompt", "invalid_type")
    return GenerationRequest(kind="completion", prompt=prompt, **common)
