"""Interactive terminal chat: ``python -m pensieve.engine chat [--url URL | --model PATH]``.

One conversation (one session), replies streamed as they are generated, and after
each reply a line saying how many prompt tokens came from the session's cache and
from which tier (GPU, CPU), how many were recomputed and how many were new.

Two back-ends with one interface (``turn``): ``HTTPChat`` talks to a running server
(OpenAI chat API, streaming, ``session_mode: append`` so the server keeps the
history; the tier breakdown is ``usage.prompt_tokens_details.context_sources``),
``LocalChat`` runs an in-process engine and sends the whole history each turn.
Uses only the standard library on the HTTP side (no openai dependency).
"""
from __future__ import annotations

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import PensieveError

OnText = Callable[[str], None]


@dataclass
class TurnResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    sources: dict[str, int] = field(default_factory=dict)  # gpu, cpu, recomputed, new
    ttft_s: float | None = None
    finish_reason: str | None = None


class ChatError(PensieveError):
    """A turn failed (the server's error message, or a connection problem)."""


def format_stats(r: TurnResult) -> str:
    s = r.sources
    where = (f"gpu {s.get('gpu', 0)}, cpu {s.get('cpu', 0)}" if s else "tiers not reported")
    ttft = f"TTFT {1000 * r.ttft_s:.0f} ms" if r.ttft_s is not None else "TTFT -"
    recomputed = f", {s.get('recomputed', 0)} recomputed" if s else ""
    new = s.get("new", r.prompt_tokens - r.cached_tokens) if s else r.prompt_tokens - r.cached_tokens
    return (f"  [prompt {r.prompt_tokens} tokens: {r.cached_tokens} from cache ({where}){recomputed}, "
            f"{new} new | {r.completion_tokens} generated | {ttft}]")


# ---------------------------------------------------------------- HTTP back-end


class HTTPChat:
    """One session on a running Pensieve server."""

    def __init__(self, url: str, api_key: str | None, session_id: str, system: str | None,
                 max_tokens: int, temperature: float, model: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key, self.session_id, self.system = api_key, session_id, system
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        self.model = model or self._first_model()
        self.first = True

    def _request(self, path: str, body: dict | None = None, method: str | None = None):
        headers = {"Content-Type": "application/json", "X-Session-ID": self.session_id}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise ChatError(_error_message(e)) from None
        except urllib.error.URLError as e:
            raise ChatError(f"cannot reach {self.base}: {e.reason}") from None

    def _first_model(self) -> str:
        with self._request("/models") as resp:
            data = json.load(resp).get("data") or []
        if not data:
            raise ChatError(f"{self.base}/models lists no model")
        return data[0]["id"]

    def turn(self, content: str, on_text: OnText) -> TurnResult:
        messages = [{"role": "user", "content": content}]
        if self.first and self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        body = {"model": self.model, "messages": messages, "stream": True, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream_options": {"include_usage": True},
                "session_mode": "append"}
        t0 = time.perf_counter()
        text, ttft, usage, finish = [], None, None, None
        with self._request("/chat/completions", body) as resp:
            for event in _sse_events(resp):
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        text.append(piece)
                        on_text(piece)
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    usage = event["usage"]
        self.first = False
        usage = usage or {}
        details = usage.get("prompt_tokens_details") or {}
        return TurnResult("".join(text), usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                          details.get("cached_tokens", 0), details.get("context_sources") or {}, ttft, finish)

    def reset(self) -> None:
        try:
            self._request(f"/sessions/{self.session_id}", method="DELETE").close()
        except ChatError:
            pass  # a session that never finished a turn does not exist yet
        self.session_id = new_session_id()
        self.first = True


def _sse_events(resp):
    """JSON objects of a server-sent event stream, until ``data: [DONE]``."""
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ChatError(event["error"].get("message", str(event["error"])))
        yield event


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        return f"HTTP {e.code}: {json.loads(e.read())['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {e.code}: {e.reason}"


# ---------------------------------------------------------------- in-process back-end


class LocalChat:
    """One session on an in-process engine (no server); keeps the history itself."""

    def __init__(self, engine, session_id: str, system: str | None, max_tokens: int, temperature: float):
        self.engine, self.session_id, self.system = engine, session_id, system
        self.max_tokens, self.temperature = max_tokens, temperature
        self.model = engine.served_model_name
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(self, content: str, on_text: OnText) -> TurnResult:
        from .sampling import SamplingParams

        messages = self.history + [{"role": "user", "content": content}]
        params = SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)
        t0 = time.perf_counter()
        rid = self.engine.add_request(self.engine.encode_chat(messages), params, session_id=self.session_id)
        text, ttft, last = [], None, None
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id != rid:
                    continue
                if out.new_text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(out.new_text)
                    on_text(out.new_text)
                last = out
        reply = "".join(text)
        self.history = messages + [{"role": "assistant", "content": reply}]
        return TurnResult(reply, last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens,
                          dict(last.context_sources), ttft, last.finish_reason)

    def reset(self) -> None:
        self.engine.delete_session(self.session_id)
        self.session_id = new_session_id()
        self.history = [{"role": "system", "content": self.system}] if self.system else []


def new_session_id() -> str:
    return "chat-" + secrets.token_hex(4)


# ---------------------------------------------------------------- the loop

HELP = "/reset starts a new conversation, /quit (or Ctrl-D) ends"


def repl(chat, read: Callable[[str], str] = input, write=sys.stdout) -> int:
    """Read a line, stream the reply, print where the context came from; until EOF or /quit."""
    write.write(f"chatting with {chat.model} (session {chat.session_id}); {HELP}\n")
    write.flush()
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            write.write(f"new session {chat.session_id}\n")
            continue
        write.write("bot> ")
        write.flush()

        def show(piece: str) -> None:
            write.write(piece)
            write.flush()

        try:
            result = chat.turn(line, show)
        except (ChatError, PensieveError) as e:
            write.write(f"\nerror: {e}\n")
            continue
        write.write("\n" + format_stats(result) + "\n")
        write.flush()
