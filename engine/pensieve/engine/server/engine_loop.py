"""The engine's serving loop, wherever the engine runs.

``serve`` runs LLMEngine in an engine process of its own (engine_process.py)
or, with ``--engine-process off``, in a thread of the server (worker.py);
both run this loop, which alone touches the engine. The engine is
single-threaded, so the loop is the one caller of every engine method.

Commands (plain tuples, picklable):

    ("add", cid, request_id, prompt_ids, params, session_id, owner, stored_context)
    ("abort", request_id)
    ("call", cid, op_name, args)      # ops.OPS[op_name](engine, *args); cid None: no reply wanted
    ("stop",)                         # leave the loop

One iteration: apply the commands that arrived, forget idle sessions' KV
(every second), take one engine step, and hand over ONE ``Batch``: the
step's outputs, the commands' results, the requests a failed step took down,
and the metrics snapshot when it is due (at most every ``SNAPSHOT_INTERVAL``
while busy, at once when the engine turns idle, every second when idle).
"""
from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PensieveError, QueueFullError
from ..request import RequestOutput
from .ops import OPS
from .snapshot import EngineSnapshot, engine_metrics_snapshot

log = logging.getLogger("pensieve.server")

EXPIRY_INTERVAL = 1.0     # seconds between checks for idle sessions to forget
SNAPSHOT_INTERVAL = 0.05  # seconds between snapshots while steps run
IDLE_WAIT = 1.0           # seconds an idle loop waits for a command
STATS_INTERVAL = 10.0     # seconds between the step-statistics log lines while steps run


@dataclass
class Batch:
    """What one iteration hands to the server."""

    outputs: list[RequestOutput] = field(default_factory=list)
    results: list[tuple[int, bool, Any]] = field(default_factory=list)      # (cid, ok, value or error)
    failed: list[tuple[list[str], BaseException]] = field(default_factory=list)  # a step's error, its requests
    snapshot: EngineSnapshot | None = None

    def __bool__(self) -> bool:
        return bool(self.outputs or self.results or self.failed or self.snapshot is not None)


class EngineLoop:
    def __init__(self, engine, max_waiting_requests: int):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._next_expiry = 0.0
        self._last_snapshot = 0.0
        self.step_log = StepLog(engine)

    def run(self, receive: Callable[[float], list[tuple]], send: Callable[[Batch], None]) -> None:
        """Serve until a ("stop",) command. ``receive(timeout)`` returns the commands that
        arrived, waiting up to ``timeout`` seconds when there are none."""
        engine = self.engine
        while True:
            cmds = receive(0.0 if engine.has_unfinished() else IDLE_WAIT)
            batch = Batch()
            stop = self._apply(cmds, batch)
            now = time.monotonic()
            if now >= self._next_expiry:
                self._next_expiry = now + EXPIRY_INTERVAL
                engine.expire_idle_sessions()  # their KV only: the session store keeps the records
            stepped = engine.has_unfinished()
            if stepped:
                self._step(batch)
                self.step_log.stepped(now)
            worked = stepped or bool(cmds)
            since = time.monotonic() - self._last_snapshot
            if (worked and (since >= SNAPSHOT_INTERVAL or not engine.has_unfinished())) or since >= IDLE_WAIT:
                batch.snapshot = self._snapshot()
            if batch:
                send(batch)
            if stop:
                return

    def _step(self, batch: Batch) -> None:
        engine = self.engine
        try:
            batch.outputs = engine.step()
        except Exception as e:  # a bug in a step: fail the requests in flight, keep serving
            log.exception("engine step failed; aborting %d requests", len(engine.requests))
            ids = list(engine.requests)
            for rid in ids:
                try:
                    engine.abort(rid)
                except Exception:
                    log.exception("abort of %s failed", rid)
            batch.failed.append((ids, portable(e)))

    def _snapshot(self) -> EngineSnapshot | None:
        self._last_snapshot = time.monotonic()
        try:
            return engine_metrics_snapshot(self.engine)
        except Exception:
            log.exception("metrics snapshot failed")
            return None

    def _apply(self, cmds: list[tuple], batch: Batch) -> bool:
        """Apply commands in order; True if one was ("stop",)."""
        engine = self.engine
        for cmd in cmds:
            kind = cmd[0]
            if kind == "add":
                _, cid, rid, prompt_ids, params, session_id, owner, stored = cmd
                try:
                    if len(engine.scheduler.waiting) >= self.max_waiting_requests:
                        raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
                    engine.add_request(prompt_ids, params, request_id=rid, session_id=session_id, owner=owner,
                                       stored_context=stored)
                    batch.results.append((cid, True, engine.requests[rid].num_prompt_tokens))
                except PensieveError as e:
                    batch.results.append((cid, False, portable(e)))
                except Exception as e:
                    log.exception("request %s could not be added", rid)
                    batch.results.append((cid, False, portable(e)))
            elif kind == "abort":
                out = engine.abort(cmd[1])
                if out is not None:
                    log.info("req=%s aborted after %d generated tokens", out.request_id, out.num_output_tokens)
                    batch.outputs.append(out)
            elif kind == "call":
                _, cid, name, args = cmd
                try:
                    result = OPS[name](engine, *args)
                except Exception as e:  # handed to the caller
                    if cid is None:
                        log.exception("engine operation %s failed", name)
                    else:
                        batch.results.append((cid, False, portable(e)))
                else:
                    if cid is not None:
                        batch.results.append((cid, True, result))
            elif kind == "stop":
                return True
            else:
                log.error("unknown engine command %r", kind)
        return False


class StepLog:
    """One log line every ``STATS_INTERVAL`` seconds of serving: steps by path, where a step's host
    time went (scheduling, launching, waiting for the device), queues, preemptions and copies
    between the tiers. It says whether the host or the device sets the pace, and what the
    CPU tier costs, without a profiler."""

    def __init__(self, engine):
        self.engine = engine
        self.start = None
        self.last_info = None
        self.sums = [0, 0.0, 0.0, 0.0]  # steps, schedule, launch, wait (seconds)
        self.base = self._counters()

    def _counters(self) -> dict:
        e = self.engine
        c = {f"path:{k}": v for k, v in e.stats.step_paths.items()}
        c["preemptions"] = e.stats.preemptions
        for d in ("in", "out", "out_in_step"):
            c[d] = e.swap_bytes(d)
        return c

    def stepped(self, now: float) -> None:
        info = self.engine.last_step
        if info is not None and info is not self.last_info:
            self.last_info = info
            n = self.sums
            n[0] += 1
            n[1] += info.schedule_s
            n[2] += info.launch_s
            n[3] += info.wait_s
        if self.start is None:
            self.start = now
        elif now - self.start >= STATS_INTERVAL:
            log.info("%s", self.line(now))
            self.start, self.sums, self.base = now, [0, 0.0, 0.0, 0.0], self._counters()

    def line(self, now: float) -> str:
        span = max(now - self.start, 1e-9)
        steps, sched, launch, wait = self.sums
        per = (lambda x: 1e3 * x / steps) if steps else (lambda x: 0.0)
        c = self._counters()
        d = {k: c[k] - self.base.get(k, 0) for k in c}
        paths = ", ".join(f"{k[5:]} {v}" for k, v in sorted(d.items()) if k.startswith("path:") and v)
        s = self.engine.scheduler
        return (f"steps: {steps} in {span:.1f} s ({paths or 'none'}), {1e3 * span / max(steps, 1):.2f} ms each: "
                f"schedule {per(sched):.2f}, launch {per(launch):.2f}, wait for the device {per(wait):.2f} ms; "
                f"running {len(s.running)}, waiting {len(s.waiting)}, preempted {d['preemptions']}; "
                f"swap in {d['in'] / span / 1e9:.2f} GB/s, out {d['out'] / span / 1e9:.2f} GB/s "
                f"(in-step {d['out_in_step'] / span / 1e9:.2f})")


def portable(e: BaseException) -> BaseException:
    """The error itself if it survives pickling (it may cross to the server process), else a
    RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")
