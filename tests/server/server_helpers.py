"""Helpers of the server tests: start a real server process on loopback, read its state."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY1, KEY2 = "test-key-one", "test-key-two"
MODEL = "tiny-llama"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def headers(self, key: str | None = KEY1, **extra) -> dict:
        h = {"Authorization": f"Bearer {key}"} if key else {}
        h.update(extra)
        return h

    def state(self) -> dict:
        r = httpx.get(self.url + "/debug/state", headers=self.headers(), timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Wait until no request is in flight anywhere (server, inbox, engine); returns the state."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if s["num_unfinished"] == 0 and s["server"]["inflight"] == 0 and s["server"]["inbox"] == 0:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {s}")
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, log: Path, *args: str, env: dict | None = None, port: int | None = None) -> Server:
    """A server process; unless told otherwise its session store is a fresh SQLite file beside the log."""
    port = port or free_port()
    if "--session-store" not in args and "PENSIEVE_SESSION_STORE" not in (env or {}):
        args = (*args, "--session-store", f"sqlite:///{log.parent / (log.stem + '-sessions.sqlite3')}")
    cmd = [sys.executable, "-m", "pensieve.engine", "serve", "--model", str(ckpt), "--served-model-name", MODEL,
           "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, "TRITON_INTERPRET": "1", **(env or {})}
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return Server(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
