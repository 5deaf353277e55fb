"""The aiohttp application: OpenAI-compatible endpoints plus sessions.

Endpoints (docs/design.md, "HTTP API"; tests/test_design_contract.py keeps the
two in agreement):

    POST   /v1/chat/completions     chat (SSE with "stream": true); sessions by X-Session-ID or body session_id
    POST   /v1/completions          raw prompts (string or token ids)
    GET    /v1/models
    GET    /v1/sessions/{id}        a session's state (its owner's key only)
    DELETE /v1/sessions/{id}
    GET    /health  /ready  /metrics
    GET    /debug/state             engine blocks, requests and sessions in numbers (tests and operators)

Sessions. ``"session_mode": "full"`` (default): the client sends the whole
conversation each turn and the engine reuses the cached prefix that matches.
``"session_mode": "append"``: the client sends only the new messages; the
server extends the session's stored tokens with the chat template's text for
them (``PromptEncoder.encode_continuation``), or renders the stored transcript
plus them when the stored tokens do not end with the last reply as generated.
Every finished turn is saved in the session store (conversations.py); the KV
cache only speeds turns up, and a turn whose KV this engine lacks recomputes
the stored conversation (``usage.prompt_tokens_details.recomputed_tokens``).
Turns of one session are sequential: a second request while one is in flight
gets 409 ``session_busy``. A session is named by (API key, id): another key's
id is an unused id in this key's namespace. DELETE ends a running turn at once
(409 ``session_deleted`` to its request, or that error event in its stream).

Status codes: 400 bad input (also a context too long: code
``context_length_exceeded``; a prompt the tokenizer or the chat template
refuses), 401 missing or wrong key, 404 unknown model, session or route, 405
wrong method, 408 body not received within ``--body-timeout``, 409 session
busy, 413 body over ``--max-body-bytes``, 429 waiting queue full
(Retry-After), 503 draining (or ``--max-connections`` open, or the engine died:
``engine_unavailable``), 500 an internal
error. Request body extensions: ``session_id``, ``session_mode``,
``ignore_eos``, ``top_k``.

Prompts are rendered and tokenized in a small thread pool of this process
(``PromptEncoder``; the Rust tokenizer runs without the GIL), never where the
engine runs: a huge prompt delays nobody else's step. The engine (its own
process by default: engine_process.py) gets and returns token ids; this
process turns them into text and finds stop strings (``TextStream``, one per
request), and on a stop string tells the engine to end the request at that
token. Everything logged from a request goes through ``logsafe.clean``.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..cache_manager import stored_context_len
from ..detokenizer import TextStream
from ..errors import EngineDeadError
from ..request import SessionKey
from . import memory
from .config import ServerConfig
from .conversations import Conversations, Turn, session_deleted
from .logsafe import clean
from .metrics import ServerMetrics
from .protocol import (APIError, GenerationRequest, bad, check_session_id, from_engine_error, parse_chat,
                       parse_completion, parse_json_body, session_not_found)
from .store import SessionRecord, default_store_url, open_store
from .worker import EngineClient, EngineInfo, engine_params

log = logging.getLogger("pensieve.server")

TOKENIZER_THREADS = min(4, os.cpu_count() or 1)


class PensieveServer:
    def __init__(self, info: EngineInfo, client: EngineClient, config: ServerConfig,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.info = info
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.worker = client
        client.on_death = self._engine_died
        self.exit_code = 0
        self.metrics = ServerMetrics(lambda: self.worker.snapshot, info.cache_labels)
        self.model_names = {info.served_model_name, info.model}
        self._keys = {k.encode(): _owner_of(k) for k in config.api_key}
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="pensieve-tokenize")
        store = open_store(config.session_store or default_store_url(info.served_model_name),
                           info.session_idle_timeout, config.max_sessions_per_key)
        self.conversations = Conversations(store)
        self.inflight: set[str] = set()
        self.draining = False
        self.drained = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.created = int(time.time())

    # ------------------------------------------------------------------ app
    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/sessions/{session_id}", self.get_session)
        app.router.add_delete("/v1/sessions/{session_id}", self.delete_session)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/debug/state", self.debug_state)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app) -> None:
        self.worker.transport.start()
        await self.conversations.start()
        log.info("session store: %s (idle TTL %ss, at most %s sessions per key)",
                 self.conversations.store.describe(), self.conversations.store.ttl or "none",
                 self.conversations.store.max_per_owner or "any number of")

    async def _on_cleanup(self, app) -> None:
        await self.conversations.close()

    async def _on_shutdown(self, app) -> None:
        for rid in list(self.inflight):
            self.worker.abort(rid, keep_stream=True)

    def stop_worker(self) -> None:
        """Stop the engine (its process or thread) and the tokenizer pool."""
        code = self.worker.transport.stop()
        if code:
            log.warning("the engine process exited with code %s", code)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    def _engine_died(self, reason: str) -> None:
        """Nothing can be served without the engine: fail what is in flight (the client did),
        turn not ready, and end the server with a non-zero exit code so that it is restarted."""
        log.error("%s: failing %d requests in flight and shutting down", reason, len(self.inflight))
        self.exit_code = 1
        self.begin_drain()

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        rid = uuid.uuid4().hex[:16]
        request["rid"] = rid
        request["log"] = {}
        t0 = time.monotonic()
        path = request.path
        api = path.startswith("/v1/") or path.startswith("/debug/")
        status = 500
        try:
            if api and self.draining:
                raise APIError(503, "the server is draining (shutting down); retry on another replica",
                               type="service_unavailable", code="draining", headers={"Retry-After": "1"})
            if api:
                request["owner"] = self._authenticate(request)
            resp = await handler(request)
            status = resp.status
            return resp
        except APIError as e:
            status = e.status
            request["log"]["error"] = e.code or e.type
            if api and request.method == "POST":
                self.metrics.count_outcome(e.status)
            return _error_response(e, rid)
        except web.HTTPException as e:
            status = e.status
            if e.status == 413:
                err = APIError(413, f"request body is larger than {self.config.max_body_bytes} bytes",
                               code="request_too_large")
                if api and request.method == "POST":
                    self.metrics.count_outcome(413)
            else:
                err = APIError(e.status, e.reason or "error", code="not_found" if e.status == 404 else None)
            resp = _error_response(err, rid)
            for k in ("Allow",):
                if k in e.headers:
                    resp.headers[k] = e.headers[k]
            return resp
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        except Exception:
            log.exception("req=%s %s %s failed", rid, clean(request.method), clean(path))
            if api and request.method == "POST":
                self.metrics.count_outcome(500)
            return _error_response(APIError(500, "internal error", type="server_error", code="internal_error"), rid)
        finally:
            if request.get("body_bytes", 0) >= memory.BIG_BODY_BYTES:
                self._tokenizer_pool.submit(memory.trim)  # its body, text and tokens are garbage by now
            if path not in ("/metrics", "/health", "/ready"):
                extra = " ".join(f"{k}={clean(v)}" for k, v in request["log"].items())
                log.info("req=%s %s %s %d %.3fs %s", rid, clean(request.method), clean(path), status,
                         time.monotonic() - t0, extra)

    def _authenticate(self, request: web.Request) -> str | None:
        if not self._keys:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                           code="invalid_api_key")
        token_b = token.strip().encode("utf-8", "surrogateescape")
        for key, owner in self._keys.items():
            if hmac.compare_digest(key, token_b):
                return owner
        raise APIError(401, "incorrect API key", type="authentication_error", code="invalid_api_key")

    # ------------------------------------------------------------------ plain endpoints
    async def health(self, request: web.Request) -> web.Response:
        if not self.worker.alive():
            return web.json_response({"status": "engine stopped"}, status=503)
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"ready": False, "reason": "draining"}, status=503)
        if not self.worker.alive():
            return web.json_response({"ready": False, "reason": "engine stopped"}, status=503)
        return web.json_response({"ready": True})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def debug_state(self, request: web.Request) -> web.Response:
        try:
            snap = (await self.worker.call("snapshot")).as_dict()  # fresh: taken after every command posted before
        except EngineDeadError as e:
            raise from_engine_error(e) from None
        snap["server"] = {"inflight": len(self.inflight), "inbox": self.worker.inbox_size,
                          "draining": self.draining,
                          "running_turns": len(self.conversations.running)}
        return web.json_response(snap)

    async def models(self, request: web.Request) -> web.Response:
        i = self.info
        return web.json_response({"object": "list", "data": [{
            "id": i.served_model_name, "object": "model", "created": self.created, "owned_by": "pensieve",
            "max_model_len": i.max_model_len}]})

    # ------------------------------------------------------------------ sessions
    def _path_session(self, request: web.Request) -> str:
        return check_session_id(request.match_info["session_id"], self.config.max_session_id_len)

    async def get_session(self, request: web.Request) -> web.Response:
        """The stored record (transcript included) and what this engine caches of it. 404 when
        neither exists: another key's session of this id is indistinguishable from an unused id."""
        sid = self._path_session(request)
        key = SessionKey(request["owner"], sid)
        cached = await self._engine_call("session_info", key)
        record = await self.conversations.get(*key)
        running = key in self.conversations.running
        if record is None and cached is None and not running:
            raise session_not_found(sid)
        ttl = self.conversations.store.ttl
        info = {"id": sid, "object": "session",
                "num_turns": record.num_turns if record else 0,
                "num_messages": len(record.messages) if record else 0,
                "messages": record.messages if record else [],
                "context_tokens": len(record.token_ids) if record else 0,
                "created": record.created if record else None,
                "updated": record.updated if record else None,
                "expires_at": record.updated + ttl if record and ttl > 0 else None,
                "active": running,
                "cached_tokens": cached["cached_tokens"] if cached else 0,
                "cached_blocks": cached["cached_blocks"] if cached else 0,
                "idle_seconds": cached["idle_seconds"] if cached else None}
        return web.json_response(info, headers={"X-Session-ID": sid})

    async def delete_session(self, request: web.Request) -> web.Response:
        """Forget the session everywhere: a running turn ends now, the cache and the record go."""
        sid = self._path_session(request)
        key = SessionKey(request["owner"], sid)
        turn = self.conversations.end_running(key)
        if turn is not None and turn.request_id is not None:
            self.worker.abort(turn.request_id, keep_stream=True)  # its handler answers session_deleted
        cached = await self._engine_call("delete_session", key)
        stored = await self.conversations.delete(*key)
        if not (cached or stored or turn is not None):
            raise session_not_found(sid)
        return web.json_response({"id": sid, "object": "session", "deleted": True,
                                  "ended_running_turn": turn is not None})

    async def _engine_call(self, op: str, *args):
        try:
            return await self.worker.call(op, *args)
        except EngineDeadError as e:
            raise from_engine_error(e) from None

    # ------------------------------------------------------------------ generation
    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        return await self._generate(request, parse_chat(body, self.config))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        return await self._generate(request, parse_completion(body, self.config))

    async def _read_json(self, request: web.Request) -> dict:
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        try:
            raw = await asyncio.wait_for(_read_body(request, limit), self.config.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.config.body_timeout:g} seconds",
                           code="request_timeout", headers={"Connection": "close"}) from None
        request["body_bytes"] = len(raw)
        return parse_json_body(raw)

    async def _encode(self, messages: list[dict] | None, prompt: str | list[int] | None,
                      extend: SessionRecord | None = None) -> list[int]:
        """The prompt's token ids, computed in the tokenizer pool (the engine only gets ids).
        Token-id prompts pass through: the engine checks them against its vocabulary.
        ``extend``: the record whose transcript starts ``messages`` and whose tokens the prompt
        extends where it can (``PromptEncoder.encode_append``)."""
        enc = self.info.prompts
        if extend is not None:
            fn = functools.partial(enc.encode_append, extend.token_ids, extend.messages,
                                   messages[len(extend.messages):])
        elif messages is not None:
            fn = functools.partial(enc.encode_chat, messages)
        elif isinstance(prompt, str):
            fn = functools.partial(enc.encode_text, prompt)
        else:
            return prompt
        try:
            return await self.loop.run_in_executor(self._tokenizer_pool, fn)
        except Exception as e:
            err = from_engine_error(e)
        # Raised outside the except block: the error must not chain the tokenizer's exception,
        # whose traceback holds the prompt until the error is collected.
        raise err

    def _session_of(self, request: web.Request, greq: GenerationRequest) -> str | None:
        header = request.headers.get("X-Session-ID")
        if header is not None:
            check_session_id(header, self.config.max_session_id_len, param="X-Session-ID")
            if greq.session_id is not None and greq.session_id != header:
                raise bad("the X-Session-ID header and the body's session_id differ", "session_id",
                          "invalid_session_id")
            return header
        return greq.session_id

    async def _generate(self, request: web.Request, greq: GenerationRequest) -> web.StreamResponse:
        t_arrival = time.monotonic()
        if greq.model not in self.model_names:
            raise APIError(404, f"model {greq.model!r} not found; this server serves "
                                f"{self.info.served_model_name!r}", param="model", code="model_not_found")
        sid = self._session_of(request, greq)
        owner = request["owner"]
        lg = request["log"]
        if sid is not None:
            lg["session"] = sid
        if greq.session_mode == "append" and sid is None:
            raise bad("session_mode 'append' needs a session (X-Session-ID header or session_id)", "session_mode",
                      "missing_required_parameter")

        turn = await self.conversations.begin(owner, sid) if sid is not None else None
        try:
            return await self._run_turn(request, greq, sid, owner, turn, t_arrival)
        finally:
            if turn is not None:
                self.conversations.end(turn)

    async def _run_turn(self, request: web.Request, greq: GenerationRequest, sid: str | None, owner: str | None,
                        turn: Turn | None, t_arrival: float) -> web.StreamResponse:
        lg = request["log"]
        record = turn.record if turn is not None else None
        messages = greq.messages
        extend = None  # an append-mode turn's record whose tokens the prompt may extend
        if greq.kind == "chat" and greq.session_mode == "append":
            messages = (list(record.messages) if record is not None else []) + greq.messages
            extend = record if record is not None and record.reply_is_tail else None
        if turn is not None and turn.deleted:  # deleted while its record was being read
            raise session_deleted(sid)
        history = record.token_ids if record is not None else None
        params = greq.params

        rid = ("chatcmpl-" if greq.kind == "chat" else "cmpl-") + request["rid"]
        lg["id"] = rid
        self.inflight.add(rid)
        self._idle.clear()
        if turn is not None:
            turn.request_id = rid
        finished = False
        try:
            prompt_ids = await self._encode(messages, greq.prompt, extend)
            stored = 0
            if history:  # a long history is compared off the loop, and never sent to the engine
                stored = await self.loop.run_in_executor(self._tokenizer_pool, stored_context_len, history, prompt_ids)
            fut, queue = self.worker.add(rid, prompt_ids, engine_params(params), sid, owner, stored)
            try:
                lg["prompt"] = await fut
            except Exception as e:
                raise from_engine_error(e, sid) from None
            if turn is not None:
                turn.prompt_ids = prompt_ids
            ctx = _Gen(self, greq, rid, sid, owner, t_arrival, messages, turn, prompt_ids)
            if greq.stream:
                resp = await ctx.stream(request, queue)
            else:
                resp = await ctx.collect(queue)
            finished = ctx.finished
            lg.update(cached=ctx.cached, recomputed=ctx.recomputed, gen=ctx.num_output, finish=ctx.finish_reason,
                      ttft=f"{ctx.ttft:.3f}" if ctx.ttft is not None else "-")
            return resp
        finally:
            if finished:
                self.worker.release(rid)
            else:
                self.worker.abort(rid)  # disconnect, error or cancellation: free what it holds
            self.inflight.discard(rid)
            if not self.inflight:
                self._idle.set()

    # ------------------------------------------------------------------ drain
    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining: /ready is false, new requests get 503; %d in flight, %.0fs grace",
                 len(self.inflight), self.config.drain_timeout)
        self.loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.config.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain grace period over: aborting %d requests", len(self.inflight))
            for rid in list(self.inflight):
                self.worker.abort(rid, keep_stream=True)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                log.warning("%d requests still open after abort", len(self.inflight))
        log.info("drained")
        self.drained.set()


class _Gen:
    """One generation's bookkeeping: response shapes, metrics, session history."""

    def __init__(self, server: PensieveServer, greq: GenerationRequest, rid: str, sid: str | None,
                 owner: str | None, t_arrival: float, messages: list[dict] | None, turn: Turn | None,
                 prompt_ids: list[int]):
        self.server, self.greq, self.rid, self.sid, self.owner = server, greq, rid, sid, owner
        self.turn = turn
        self.text = TextStream(server.info.tokenizer, prompt_ids, greq.params.stop)
        self.token_ids: list[int] = []  # generated so far
        self.t_arrival = t_arrival
        self.messages = messages
        self.t_last: float | None = None
        self.ttft: float | None = None
        self.finished = False
        self.disconnected = False
        self.finish_reason: str | None = None
        self.num_prompt = 0
        self.cached = 0
        self.sources: dict[str, int] = {}
        self.recomputed = 0
        self.num_output = 0
        self.created = int(time.time())
        self.model = server.info.served_model_name

    @property
    def chat(self) -> bool:
        return self.greq.kind == "chat"

    def headers(self) -> dict:
        h = {"X-Request-ID": self.rid}
        if self.sid is not None:
            h["X-Session-ID"] = self.sid
        return h

    def _take(self, out) -> tuple[str, int]:
        """Account one RequestOutput (or raise the engine's error); returns the text it releases
        and how many of its tokens count. A stop string found in its text ends the reply there:
        the engine is told to end the request at that token (it may have sampled a few more,
        which are dropped here and there)."""
        if isinstance(out, EngineDeadError):
            raise from_engine_error(out)
        if isinstance(out, BaseException):
            raise APIError(500, f"the engine failed while running this request: {out}", type="server_error",
                           code="internal_error")
        now = time.monotonic()
        m = self.server.metrics
        ids = out.new_token_ids
        reason = out.finish_reason if out.finished else None
        n_new = len(ids)
        # The engine ends on its own only at a stop token or EOS ("stop", never pushed as text) or at a length.
        for i, token in enumerate(ids[:-1] if reason == "stop" else ids):
            if self.text.push(token):
                n_new, reason = i + 1, "stop"
                break
        stopped_here = self.text.stopped and not (out.finished and n_new == len(ids))
        if n_new:
            if self.ttft is None:
                self.ttft = now - self.t_arrival
                m.ttft.observe(self.ttft)
            elif self.t_last is not None:
                gap = (now - self.t_last) / n_new
                for _ in range(n_new):
                    m.itl.observe(gap)
            self.t_last = now
        self.token_ids.extend(ids[:n_new])
        self.num_prompt, self.cached, self.num_output = out.num_prompt_tokens, out.num_cached_tokens, len(self.token_ids)
        if out.context_sources:
            self.sources = out.context_sources
            self.recomputed = out.num_recomputed_tokens
        if stopped_here:
            self.server.worker.stop_at(self.rid, self.num_prompt + self.num_output, self.turn.key if self.turn else None)
        new_text = self.text.release(final=reason is not None and reason != "abort")
        if reason is not None:
            self.finished = True
            self.finish_reason = reason
            m.latency.observe(now - self.t_arrival)
            m.count_outcome(reason)
            if reason == "abort" and self.turn is not None and self.turn.deleted:
                raise session_deleted(self.sid)
        return new_text, n_new

    async def _save(self) -> None:
        """Save the finished turn in the session store (before the client sees the end of it, so a
        next turn, on any engine, finds it). The transcript records chat turns of either mode."""
        turn = self.turn
        if turn is None or not self.finished or self.finish_reason == "abort":
            return
        messages = None
        if self.chat:
            messages = list(self.messages) + [{"role": "assistant", "content": self.text.text}]
        # a stop string ends the text before the last tokens: the transcript is then re-rendered next turn
        await self.server.conversations.commit(turn, turn.prompt_ids + self.token_ids, messages,
                                               reply_is_tail=not self.text.stopped)

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt, "completion_tokens": self.num_output,
                "total_tokens": self.num_prompt + self.num_output,
                "prompt_tokens_details": {"cached_tokens": self.cached, "recomputed_tokens": self.recomputed,
                                          "context_sources": dict(self.sources or {})}}

    async def collect(self, queue: asyncio.Queue) -> web.Response:
        while not self.finished:
            self._take(await queue.get())
        await self._save()
        text = self.text.text
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": self.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish_reason}
            obj = "text_completion"
        body = {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage()}
        if self.sid is not None:
            body["session_id"] = self.sid
        return web.json_response(body, headers=self.headers())

    def _chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    async def stream(self, request: web.Request, queue: asyncio.Queue) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **self.headers()})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

        # The first chunk leaves when the first token is sampled (chat: the role chunk; completions:
        # a chunk whose text may be empty), not when its text is non-empty: a client's time to first
        # chunk is then the TTFT, whatever the tokenizer makes of that token.
        first = True
        try:
            while not self.finished:
                item = await queue.get()
                try:
                    new_text, n_new = self._take(item)
                except APIError as e:  # the 200 is sent: the error is the stream's last event
                    self.server.metrics.count_outcome(e.status)
                    await send(e.body())
                    break
                if first and (n_new or self.finished):
                    first = False
                    if self.chat:
                        await send(self._chunk("", None, first=True))
                    elif not new_text and not self.finished:
                        await send(self._chunk("", None))
                if new_text or self.finished:
                    chunk = self._chunk(new_text or None, self.finish_reason if self.finished else None)
                    if self.finished and self.greq.include_usage is False:
                        chunk["usage"] = self.usage()  # harmless extension; clients that asked get the OpenAI shape too
                    if self.finished:
                        try:
                            await self._save()
                        except APIError as e:  # the turn was not saved: say so instead of a clean end
                            await send(chunk)
                            await send(e.body())
                            break
                    await send(chunk)
            if self.finished and self.greq.include_usage:
                usage_chunk = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
                await send(usage_chunk)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            # The client went away mid-stream: the caller aborts the request.
            self.finished = False
            self.disconnected = True
        return resp


def _owner_of(key: str) -> str:
    """Sessions record a digest of the key that made them, not the key."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def _error_response(e: APIError, rid: str) -> web.Response:
    headers = {"X-Request-ID": rid, **e.headers}
    resp = web.json_response(e.body(), status=e.status, headers=headers)
    if headers.get("Connection") == "close":
        resp.force_close()
    return resp


async def _read_body(request: web.Request, limit: int) -> bytearray:
    """The whole body, at most ``limit`` bytes (413 beyond). Unlike ``request.read()`` it is not
    cached on the request, which aiohttp keeps alive until the connection's next request."""
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return body
