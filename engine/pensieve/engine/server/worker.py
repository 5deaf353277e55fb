"""The engine thread: runs LLMEngine beside the asyncio loop.

The engine is single-threaded, so exactly one thread (this one) touches it.
The HTTP side talks to it through a thread-safe inbox of commands; the loop
here is: drain the inbox (add / abort / call), take one engine step, hand the
step's outputs back to the asyncio loop with ``call_soon_threadsafe``, refresh
the metrics snapshot, and sleep on an event when nothing is unfinished. HTTP
handlers therefore never wait on a model step: they await futures and queues
that this thread completes.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable

from ..errors import PensieveError, QueueFullError
from ..request import RequestOutput
from .snapshot import EngineSnapshot, engine_metrics_snapshot

log = logging.getLogger("pensieve.server")

EXPIRY_INTERVAL = 1.0  # seconds between checks for idle sessions to forget


class EngineWorker:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop, max_waiting_requests: int):
        self.engine = engine
        self.loop = loop
        self.max_waiting_requests = max_waiting_requests
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, asyncio.Queue] = {}   # touched on the loop thread only
        self.snapshot: EngineSnapshot = engine_metrics_snapshot(engine)
        self._thread = threading.Thread(target=self._run, name="pensieve-engine", daemon=True)
        self.fatal: BaseException | None = None

    # ------------------------------------------------------------ loop side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def inbox_size(self) -> int:
        return len(self._inbox)

    def _post(self, cmd: tuple) -> None:
        self._inbox.append(cmd)
        self._wake.set()

    def call(self, fn: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``fn(engine)`` on the engine thread between steps; the future gets its result or exception."""
        fut = self.loop.create_future()
        self._post(("call", fn, fut))
        return fut

    def add(self, request_id: str, build: Callable[[Any], tuple], session_id: str | None,
            owner: str | None, history: list[int] | None = None) -> tuple[asyncio.Future, asyncio.Queue]:
        """Queue a request. ``build(engine)`` runs on the engine thread and returns
        ``(prompt, SamplingParams)``; it must be cheap (the server passes token ids, tokenized
        beforehand in its own pool, so no prompt ever delays a step).
        ``history``: the session's token history from the session store (see LLMEngine.add_request).
        Returns a future (``(prompt token count, prompt token ids)``, or the error) and the queue
        of its outputs."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        fut = self.loop.create_future()
        self._post(("add", request_id, build, session_id, owner, history, fut))
        return fut, queue

    def abort(self, request_id: str, keep_stream: bool = False) -> None:
        """Abort a request. With ``keep_stream`` its handler still receives the final
        (finish_reason "abort") output; otherwise (the client is gone) nothing more is delivered."""
        if not keep_stream:
            self._streams.pop(request_id, None)
        self._post(("abort", request_id))

    def release(self, request_id: str) -> None:
        """Forget a finished request's output queue."""
        self._streams.pop(request_id, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def _dispatch_error(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(exc)

    def _resolve(self, fut: asyncio.Future, result=None, exc: BaseException | None = None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        next_expiry = 0.0
        while not self._stop:
            self._wake.clear()
            worked = self._drain_inbox()
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRY_INTERVAL
                engine.expire_idle_sessions()  # their KV only: the session store keeps the records
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:  # a bug in a step: fail the requests in flight, keep serving
                    log.exception("engine step failed; aborting %d requests", len(engine.requests))
                    ids = list(engine.requests)
                    for rid in ids:
                        try:
                            engine.abort(rid)
                        except Exception:
                            log.exception("abort of %s failed", rid)
                    self.loop.call_soon_threadsafe(self._dispatch_error, ids, e)
                    outputs = []
                if outputs:
                    self.loop.call_soon_threadsafe(self._dispatch, outputs)
                worked = True
            if worked:
                self._refresh()
            else:
                self._wake.wait(1.0)
                self._refresh()

    def _refresh(self) -> None:
        try:
            self.snapshot = engine_metrics_snapshot(self.engine)
        except Exception:
            log.exception("metrics snapshot failed")

    def _drain_inbox(self) -> bool:
        worked = False
        engine = self.engine
        while self._inbox:
            cmd = self._inbox.popleft()
            worked = True
            kind = cmd[0]
            if kind == "add":
                _, rid, build, session_id, owner, history, fut = cmd
                try:
                    if len(engine.scheduler.waiting) >= self.max_waiting_requests:
                        raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
                    prompt, params = build(engine)
                    engine.add_request(prompt, params, request_id=rid, session_id=session_id, owner=owner,
                                       history=history)
                    req = engine.requests[rid]
                    n_prompt = (req.num_prompt_tokens, req.token_ids[:req.num_prompt_tokens])
                except PensieveError as e:
                    self.loop.call_soon_threadsafe(self._resolve, fut, None, e)
                except Exception as e:
                    log.exception("request %s could not be added", rid)
                    self.loop.call_soon_threadsafe(self._resolve, fut, None, e)
                else:
                    self.loop.call_soon_threadsafe(self._resolve, fut, n_prompt, None)
            elif kind == "abort":
                out = engine.abort(cmd[1])
                if out is not None:
                    log.info("req=%s aborted after %d generated tokens", out.request_id, out.num_output_tokens)
                    self.loop.call_soon_threadsafe(self._dispatch, [out])
            elif kind == "call":
                _, fn, fut = cmd
                try:
                    result = fn(engine)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    self.loop.call_soon_threadsafe(self._resolve, fut, None, e)
                else:
                    self.loop.call_soon_threadsafe(self._resolve, fut, result, None)
        return worked
