"""The engine core in a process of its own (``serve``'s default, ``--engine-process on``).

The server process keeps HTTP, tokenization, chat templates and
detokenization with stop strings; the engine process owns LLMEngine and runs
EngineLoop (engine_loop.py). They share no interpreter lock. IPC is two
one-way ``multiprocessing`` pipes (Unix socketpairs) carrying pickled
messages:

- server -> engine: a list of commands per message (a writer thread sends
  whatever the handlers posted since its last send, so the event loop never
  blocks on a full pipe);
- engine -> server: ("ready", info) once, or ("failed", message); then one
  ("batch", outputs, results, failed, snapshot) per loop iteration, where
  ``outputs`` holds every output of that step as compact tuples (``_wire``).
  A reader thread (``recv`` releases the GIL) hands each batch to the asyncio
  loop.

Lifecycle: the process is started with the spawn method (CUDA initializes in
the child only); ``start_engine_process`` returns once the engine reports
ready, or raises ``EngineStartError`` with its error or exit code. The child
dies with the server (PR_SET_PDEATHSIG) and ignores SIGINT/SIGTERM: the
server drains, then sends ("stop",) and joins it. If the child dies, the
reader sees end-of-file and the client fails everything in flight
(EngineDeadError); the server then exits non-zero.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from ..request import RequestOutput
from .engine_loop import Batch, EngineLoop
from .snapshot import cache_config_labels
from .worker import EngineClient, EngineInfo

log = logging.getLogger("pensieve.server")

STOP_TIMEOUT = 10.0  # seconds the engine process gets to leave after ("stop",) before it is killed


class EngineStartError(RuntimeError):
    """The engine process failed to start (its error, or how it exited)."""


def _wire(out: RequestOutput) -> tuple:
    # Context sources are set at admission: sent with the first token and at the end only.
    first_or_last = out.finished or out.num_output_tokens <= len(out.new_token_ids)
    return (out.request_id, out.new_token_ids, out.finished, out.finish_reason, out.num_prompt_tokens,
            out.num_cached_tokens, out.num_output_tokens, out.context_sources if first_or_last else None)


def _unwire(t: tuple) -> RequestOutput:
    rid, ids, finished, reason, n_prompt, n_cached, n_out, sources = t
    return RequestOutput(rid, ids, "", finished, reason, n_prompt, n_cached, n_out, None, sources or {})


# ---------------------------------------------------------------- the child
def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the server's thread that started it ends."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _leave_a_core(engine) -> None:
    """On a CPU device, leave one core to the server process: an OpenMP team as large as the
    machine, beside a busy server process, keeps losing a member to the scheduler and stalls at
    every barrier (measured on 2 cores: 15 to 230 ms a decode step instead of 2). An explicit
    OMP_NUM_THREADS is respected."""
    import torch

    n = torch.get_num_threads()
    if engine.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and n > 1:
        torch.set_num_threads(n - 1)
        logging.getLogger("pensieve.engine").info("CPU device: %d compute threads, one core left to the server", n - 1)


def engine_process_main(engine_config, max_waiting_requests: int, commands: Connection, results: Connection,
                        parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the server died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a terminal's Ctrl-C reaches the whole group: the server
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # drains first, then stops this process itself
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[engine]: %(message)s",
                        force=True)
    from ..engine import LLMEngine
    from ..heap import freeze_startup_heap
    from . import memory

    memory.limit_arenas()
    try:
        engine = LLMEngine(engine_config)
    except BaseException as e:  # noqa: BLE001 - reported to the server, which exits with it
        logging.getLogger("pensieve.engine").exception("the engine failed to start")
        results.send(("failed", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    _leave_a_core(engine)
    freeze_startup_heap()  # no full garbage collection walks the model's objects while serving (heap.py)
    results.send(("ready", {"served_model_name": engine.served_model_name, "max_model_len": engine.max_model_len,
                            "cache_labels": cache_config_labels(engine)}))

    def receive(timeout: float) -> list[tuple]:
        cmds: list[tuple] = []
        try:
            if commands.poll(timeout):
                while True:
                    cmds.extend(commands.recv())
                    if not commands.poll(0):
                        break
        except (EOFError, OSError):  # the server is gone
            cmds.append(("stop",))
        return cmds

    def send(batch: Batch) -> None:
        results.send(("batch", [_wire(o) for o in batch.outputs], batch.results, batch.failed, batch.snapshot))

    EngineLoop(engine, max_waiting_requests).run(receive, send)
    # Leave without the interpreter's teardown: it would free the model, the pinned CPU tier and the
    # frozen start-up heap object by object; the OS and the driver reclaim all of it at exit. (The kill
    # on the H200 that prompted this was most likely the server's join race: EngineProcess._join_lock.)
    # What is left: tensor-parallel workers (stopped between steps, as an atexit hook would have
    # terminated them) and the logs.
    engine.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- the server side
class EngineProcess:
    """The server's side of the engine process: a writer and a reader thread."""

    def __init__(self, proc, commands: Connection, results: Connection, info: EngineInfo, client: EngineClient):
        self.proc, self.info, self.client = proc, info, client
        self._commands, self._results = commands, results
        self._outbox: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        # Process.join is not thread-safe: when the reader (at end-of-file) and stop() both wait, one
        # waitpid reaps the child and the other fails (ECHILD), so is_alive() said a child that had
        # exited in 0.3 s "did not stop within 10s" and stop() killed it and lost its exit code.
        self._join_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write, name="pensieve-engine-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="pensieve-engine-reader", daemon=True)
        client.attach(self)

    def start(self) -> None:
        self._writer.start()
        self._reader.start()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def backlog(self) -> int:
        return len(self._outbox)

    def post(self, cmd: tuple) -> None:
        with self._wake:
            self._outbox.append(cmd)
            self._wake.notify()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the engine process and wait for it; returns its exit code."""
        self._stopping = True
        self.post(("stop",))
        t0 = time.monotonic()
        with self._join_lock:
            self.proc.join(timeout)
            if self.proc.is_alive():
                log.warning("the engine process did not stop within %.1fs; killing it", time.monotonic() - t0)
                self.proc.kill()
                self.proc.join(5)
        return self.proc.exitcode

    def _write(self) -> None:
        while True:
            with self._wake:
                while not self._outbox:
                    self._wake.wait()
                cmds = list(self._outbox)
                self._outbox.clear()
            try:
                self._commands.send(cmds)
            except (OSError, ValueError):  # the engine is gone: the reader reports it
                return
            if cmds[-1] == ("stop",):
                return

    def _read(self) -> None:
        loop = self.client.loop
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                break
            _, outputs, results, failed, snapshot = msg
            batch = Batch([_unwire(t) for t in outputs], results, failed, snapshot)
            loop.call_soon_threadsafe(self.client.deliver, batch)
        with self._join_lock:
            self.proc.join(5)
        if not self._stopping:
            code = self.proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            loop.call_soon_threadsafe(self.client.engine_died, f"the engine process exited ({how})")


def start_engine_process(engine_config, max_waiting_requests: int, client: EngineClient) -> EngineProcess:
    """Start the engine process and wait until it is ready (EngineStartError if it fails)."""
    from ..checkpoint import load_tokenizer
    from ..prompt import PromptEncoder

    ctx = multiprocessing.get_context("spawn")
    cmd_recv, cmd_send = ctx.Pipe(duplex=False)
    res_recv, res_send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=engine_process_main, name="pensieve-engine",
                       args=(engine_config, max_waiting_requests, cmd_recv, res_send, os.getpid()))
    t0 = time.monotonic()
    proc.start()
    cmd_recv.close()
    res_send.close()
    try:
        tokenizer = load_tokenizer(engine_config.model)  # while the engine loads its weights
        msg = res_recv.recv()
    except EOFError:
        proc.join(5)
        raise EngineStartError(f"the engine process exited during start-up (exit code {proc.exitcode})") from None
    except BaseException:
        proc.kill()
        raise
    if msg[0] != "ready":
        proc.join(5)
        raise EngineStartError(f"the engine failed to start: {msg[1]}")
    facts = msg[1]
    log.info("engine process %d ready after %.1fs", proc.pid, time.monotonic() - t0)
    info = EngineInfo(facts["served_model_name"], engine_config.model, facts["max_model_len"],
                      engine_config.session_idle_timeout, facts["cache_labels"],
                      PromptEncoder(tokenizer, facts["max_model_len"]), tokenizer)
    return EngineProcess(proc, cmd_send, res_recv, info, client)
