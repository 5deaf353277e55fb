"""The engine core's own process: its lifecycle as the server sees it.

- SIGKILL of the engine process: the request in flight ends with a 503 error
  event (engine_unavailable), /ready is false from then on, the server logs
  why and exits 1 (so that Kubernetes restarts the pod).
- SIGTERM of the server: it drains, stops the engine process and exits 0,
  leaving no process behind; SIGKILL of the server takes the engine with it.
- An engine that fails to start: the server exits 1 with the engine's error.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from server_helpers import MODEL, free_port, start_server, stop_server

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "a long answer please"}], "max_tokens": 900,
        "temperature": 0, "ignore_eos": True, "stream": True}


def engine_pid(log) -> int:
    m = re.search(r"engine process (\d+) ready", log.read_text())
    assert m, log.read_text()[-3000:]
    return int(m.group(1))


def children(pid: int) -> list[int]:
    try:
        raw = open(f"/proc/{pid}/task/{pid}/children").read()
    except OSError:
        return []
    return [int(x) for x in raw.split()]


def gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1].startswith("Z"):  # a zombie has exited
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def first_chunks(stream, n: int):
    lines = stream.iter_lines()
    seen = 0
    for line in lines:
        if line.startswith("data: {"):
            seen += 1
            if seen == n:
                return lines
    raise AssertionError("the stream ended early")


def test_engine_killed_fails_requests_and_exits_nonzero(tiny_ckpt, tmp_path):
    srv = start_server(tiny_ckpt, tmp_path / "server.log", "--num-gpu-blocks", "128")
    try:
        pid = engine_pid(srv.log)
        assert pid in children(srv.proc.pid)
        with httpx.Client(timeout=60) as client, client.stream("POST", srv.url + "/v1/chat/completions",
                                                               json=LONG) as stream:
            assert stream.status_code == 200
            lines = first_chunks(stream, 3)
            os.kill(pid, signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events and events[-1]["error"]["code"] == "engine_unavailable", events[-3:]
        # From now on the server is not ready (503 while it finishes its handlers, then it is gone).
        try:
            r = httpx.get(srv.url + "/ready", timeout=5)
            assert r.status_code == 503 and r.json()["ready"] is False, r.text
        except httpx.TransportError:
            pass
        assert srv.proc.wait(30) == 1
        log = srv.log.read_text()
        assert "the engine process exited (killed by signal 9)" in log, log[-3000:]
    finally:
        stop_server(srv)


def test_sigterm_stops_the_engine_process_too(tiny_ckpt, tmp_path):
    srv = start_server(tiny_ckpt, tmp_path / "server.log")
    pid = engine_pid(srv.log)
    kids = children(srv.proc.pid)
    assert pid in kids
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log.read_text()[-3000:]
    for kid in kids:
        assert gone(kid), f"process {kid} outlived the server"


def test_engine_start_failure_exits_with_its_error(tiny_ckpt, tmp_path):
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "pensieve.engine", "serve", "--model", str(tiny_ckpt), "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", "99999999",
           "--session-store", f"sqlite:///{tmp_path / 's.sqlite3'}"]
    with open(log, "wb") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=120,
                              env={**os.environ, "TRITON_INTERPRET": "1"})
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "the engine failed to start" in text and "max-model-len" in text, text[-3000:]


@pytest.mark.parametrize("value", ["on", "off"])
def test_engine_process_flag_from_the_environment(tiny_ckpt, tmp_path, value):
    srv = start_server(tiny_ckpt, tmp_path / "server.log", env={"PENSIEVE_ENGINE_PROCESS": value})
    try:
        text = srv.log.read_text()
        assert (f"engine {'process' if value == 'on' else 'thread'}," in text), text[-2000:]
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0


def test_engine_process_dies_with_a_killed_server(tiny_ckpt, tmp_path):
    srv = start_server(tiny_ckpt, tmp_path / "server.log")
    pid = engine_pid(srv.log)
    srv.proc.kill()
    srv.proc.wait(10)
    assert gone(pid), "the engine process outlived a SIGKILLed server"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _opened_gpu(pid: int) -> bool:
    """Whether the process holds the GPU's device files open, as CUDA does once it initializes
    (importing torch already maps the driver library, so the maps tell nothing)."""
    fds = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fds.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return any(t.startswith("/dev/nvidia") for t in targets)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device")
def test_only_the_engine_process_uses_the_gpu(tiny_ckpt, tmp_path):
    """CUDA initializes in the engine process alone (spawned, never forked from a CUDA parent)."""
    log = tmp_path / "cuda.log"
    cmd = [sys.executable, "-m", "pensieve.engine", "serve", "--model", str(tiny_ckpt), "--device", "cuda",
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(free_port()),
           "--session-store", f"sqlite:///{tmp_path / 'cuda.sqlite3'}"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "serving" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        pid = engine_pid(log)
        # CUDA opens the device files when it initializes (PIDs in nvidia-smi may be another namespace's)
        assert _opened_gpu(pid) and not _opened_gpu(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]


class _JoinRecorder:
    """A process whose join() takes a while (as a waitpid on an exiting child does) and notes
    whether two threads were ever inside it at once: Process.join is not thread-safe."""

    def __init__(self):
        self.inside, self.overlapped, self.exitcode = 0, False, None
        self.lock = threading.Lock()

    def join(self, timeout=None):
        with self.lock:
            self.inside += 1
            self.overlapped |= self.inside > 1
        time.sleep(0.3)
        self.exitcode = 0
        with self.lock:
            self.inside -= 1

    def is_alive(self):
        return self.exitcode is None

    def kill(self):
        raise AssertionError("an engine process that exited was killed")


def test_stop_and_the_reader_never_wait_for_the_process_at_once():
    """At stop, the engine process leaves and its pipe closes: the reader thread (end-of-file) and
    stop() both wait for it. Concurrent joins made one waitpid fail and stop() kill an exited
    process ("did not stop within 10s", 0.3 s after the stop, on the H200)."""
    import multiprocessing
    import types

    from pensieve.engine.server.engine_process import EngineProcess

    cmd_recv, cmd_send = multiprocessing.Pipe(duplex=False)
    res_recv, res_send = multiprocessing.Pipe(duplex=False)

    def engine():  # leaves at ("stop",): its end of the results pipe closes
        while ("stop",) not in cmd_recv.recv():
            pass
        res_send.close()

    proc = _JoinRecorder()
    ep = EngineProcess(proc, cmd_send, res_recv, None, types.SimpleNamespace(attach=lambda t: None, loop=None))
    fake = threading.Thread(target=engine)
    fake.start()
    ep.start()
    assert ep.stop(timeout=5) == 0
    ep._reader.join(5)
    fake.join(5)
    assert not ep._reader.is_alive()
    assert not proc.overlapped
