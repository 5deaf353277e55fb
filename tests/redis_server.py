"""A real redis-server for the tests (Debian's package; scripts/bootstrap.sh installs it).

Importable as ``redis_server`` (tests/ is on sys.path). The server keeps nothing on
disk (no RDB, no AOF): the tests check what the engines do when *they* die, and a
record in a live Redis is what a deployment's Redis holds."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RedisServer:
    proc: subprocess.Popen
    host: str
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pong(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, host: str = "127.0.0.1", netns: str | None = None) -> RedisServer:
    """Start redis-server on a free port of ``host`` (inside network namespace ``netns`` if given)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run scripts/bootstrap.sh (it installs Debian's "
                           "redis-server package) or apt-get install redis-server")
    workdir.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = _free_port("127.0.0.1" if netns else host)
        cmd = [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--protected-mode", "no", "--daemonize", "no"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        proc = subprocess.Popen(cmd, stdout=open(workdir / f"redis-{port}.log", "wb"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if netns is None and _pong(host, port):
                return RedisServer(proc, host, port)
            if netns is not None and (workdir / f"redis-{port}.log").read_text().find("Ready to accept") >= 0:
                return RedisServer(proc, host, port)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    raise RuntimeError(f"redis-server did not start; see {workdir}")
