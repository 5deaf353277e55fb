"""The server's handle on the engine: ``EngineClient`` plus where the engine runs.

The engine runs EngineLoop (engine_loop.py) either in an engine process of its
own (``EngineProcess``, engine_process.py: the default of ``serve``) or in a
thread of this process (``EngineThread`` here: ``--engine-process off``,
tests that inject faults into an in-process engine). Both are a *transport*:
``post(cmd)`` sends a command, and each Batch the loop hands over reaches
``EngineClient.deliver`` on the asyncio loop. ``EngineClient`` is the only
thing app.py talks to; it is touched on the asyncio loop's thread only.
HTTP handlers never wait on a model step: they await futures and queues that
``deliver`` completes.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import EngineDeadError
from ..request import RequestOutput, SessionKey
from ..sampling import SamplingParams
from .engine_loop import Batch, EngineLoop
from .snapshot import EngineSnapshot, cache_config_labels

log = logging.getLogger("pensieve.server")


@dataclass
class EngineInfo:
    """What the server needs to know of the engine, read once at start-up."""

    served_model_name: str
    model: str
    max_model_len: int
    session_idle_timeout: float
    cache_labels: dict[str, str]
    prompts: Any                 # PromptEncoder of the server's own tokenizer
    tokenizer: Any

    @classmethod
    def of(cls, engine) -> "EngineInfo":
        return cls(engine.served_model_name, engine.config.model, engine.max_model_len,
                   engine.config.session_idle_timeout, cache_config_labels(engine), engine.prompts, engine.tokenizer)


class EngineClient:
    """Futures for commands, a queue per request, the latest snapshot; loop thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport = None
        self.snapshot = EngineSnapshot()
        self.dead: str | None = None          # why the engine is gone (None: alive)
        self.on_death: Callable[[str], None] | None = None
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()

    def attach(self, transport) -> None:
        self.transport = transport

    @property
    def inbox_size(self) -> int:
        return self.transport.backlog() if self.transport is not None else 0

    def _future(self) -> tuple[int, asyncio.Future]:
        cid, fut = next(self._ids), self.loop.create_future()
        if self.dead is not None:
            fut.set_exception(EngineDeadError(self.dead))
        else:
            self._pending[cid] = fut
        return cid, fut

    def _post(self, cmd: tuple) -> None:
        if self.dead is None:
            self.transport.post(cmd)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, session_id: str | None,
            owner: str | None, stored_context: int = 0) -> tuple[asyncio.Future, asyncio.Queue]:
        """Queue a request (token ids, tokenized beforehand in the server's pool). ``params`` should
        not ask the engine for text (the server makes it: detokenizer.py). ``stored_context``: the
        prompt's leading tokens the session store already had (LLMEngine.add_request). Returns a
        future (the prompt's token count, or the error) and the queue of its outputs."""
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        cid, fut = self._future()
        self._post(("add", cid, request_id, prompt_ids, params, session_id, owner, stored_context))
        return fut, queue

    def abort(self, request_id: str, keep_stream: bool = False) -> None:
        """Abort a request. With ``keep_stream`` its handler still receives the final
        (finish_reason "abort") output; otherwise (the client is gone) nothing more is delivered."""
        if not keep_stream:
            self._streams.pop(request_id, None)
        self._post(("abort", request_id))

    def stop_at(self, request_id: str, num_tokens: int, key: SessionKey | None) -> None:
        """End a request after ``num_tokens`` (prompt + output): its reply ended at a stop string.
        Nothing more of it is delivered."""
        self._streams.pop(request_id, None)
        self._post(("call", None, "stop_at", (request_id, num_tokens, key)))

    def release(self, request_id: str) -> None:
        """Forget a finished request's output queue."""
        self._streams.pop(request_id, None)

    def call(self, op: str, *args) -> asyncio.Future:
        """Run ``ops.OPS[op](engine, *args)`` between steps; the future gets its result or error."""
        cid, fut = self._future()
        self._post(("call", cid, op, args))
        return fut

    def deliver(self, batch: Batch) -> None:
        if batch.snapshot is not None:
            self.snapshot = batch.snapshot
        for cid, ok, value in batch.results:
            fut = self._pending.pop(cid, None)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        for ids, exc in batch.failed:
            for rid in ids:
                q = self._streams.get(rid)
                if q is not None:
                    q.put_nowait(exc)
        for out in batch.outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    def engine_died(self, reason: str) -> None:
        """The engine is gone for good: every waiting handler gets EngineDeadError."""
        if self.dead is not None:
            return
        self.dead = reason
        err = EngineDeadError(reason)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for q in self._streams.values():
            q.put_nowait(err)
        if self.on_death is not None:
            self.on_death(reason)

    def alive(self) -> bool:
        return self.dead is None and self.transport is not None and self.transport.alive()


def engine_params(params: SamplingParams) -> SamplingParams:
    """What the engine gets of a request's sampling parameters: token ids only, no stop strings
    (the server turns tokens into text and finds stop strings itself)."""
    if not params.detokenize and not params.stop:
        return params
    return dataclasses.replace(params, stop=[], detokenize=False)


class EngineThread:
    """The engine in a thread of this process (``--engine-process off``)."""

    def __init__(self, engine, client: EngineClient, max_waiting_requests: int):
        self.info = EngineInfo.of(engine)
        self.client = client
        self._loop = EngineLoop(engine, max_waiting_requests)
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pensieve-engine", daemon=True)
        client.attach(self)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> int | None:
        self.post(("stop",))
        self._thread.join(timeout)
        return None

    def alive(self) -> bool:
        return self._thread.is_alive()

    def backlog(self) -> int:
        return len(self._inbox)

    def post(self, cmd: tuple) -> None:
        self._inbox.append(cmd)
        self._wake.set()

    def _receive(self, timeout: float) -> list[tuple]:
        if not self._inbox and timeout > 0:
            self._wake.wait(timeout)
        self._wake.clear()
        cmds = []
        while self._inbox:
            cmds.append(self._inbox.popleft())
        return cmds

    def _send(self, batch: Batch) -> None:
        self.client.loop.call_soon_threadsafe(self.client.deliver, batch)

    def _run(self) -> None:
        try:
            self._loop.run(self._receive, self._send)
        except BaseException as e:  # noqa: BLE001 - the loop itself failed: nothing can be served
            log.exception("the engine thread failed")
            self.client.loop.call_soon_threadsafe(self.client.engine_died, f"the engine thread failed: {e}")
