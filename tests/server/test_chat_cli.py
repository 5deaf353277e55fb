"""`python -m pensieve.engine chat` driven through a real pseudo-terminal, as a person types:
against the shared server (--url) and in-process (--model). The second turn of a conversation
must report prompt tokens from the session's cache (GPU tier); /reset starts a new session."""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from server_helpers import KEY1

STATS = re.compile(r"\[prompt (\d+) tokens: (\d+) from cache \(gpu (\d+), cpu (\d+)\), (\d+) recomputed, (\d+) new "
                   r"\| (\d+) generated \| TTFT \d+ ms\]")


class Terminal:
    """A child process on a pty: type lines, wait for text on the screen."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TRITON_INTERPRET": "1", "TERM": "dumb"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pensieve.engine", "chat", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.screen = ""
        self.pos = 0  # what expect() has consumed

    def expect(self, pattern: str, timeout: float = 120.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.screen, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                raise AssertionError(f"{pattern!r} not seen; screen:\n{self.screen[-3000:]}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", "replace").replace("\r", "")
                except OSError:  # the child closed the pty
                    pass

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


def _conversation(term: Terminal) -> None:
    term.expect(r"chatting with \S+ \(session chat-[0-9a-f]{8}\)")
    term.expect(r"you> ")
    term.type("hello, what is a cache?")
    first = term.expect(STATS)
    prompt1, cached1 = int(first[1]), int(first[2])
    assert cached1 == 0 and int(first[6]) == prompt1
    term.expect(r"you> ")
    term.type("and the GPU tier?")
    second = term.expect(STATS)
    prompt2, cached2, gpu2, cpu2, recomputed2, new2 = (int(second[i]) for i in range(1, 7))
    assert prompt2 > prompt1 and cached2 > 0 and gpu2 + cpu2 == cached2, second[0]
    assert cached2 + recomputed2 + new2 == prompt2, second[0]
    term.expect(r"you> ")
    term.type("/reset")
    term.expect(r"new session chat-[0-9a-f]{8}")
    term.expect(r"you> ")
    term.type("hello again")
    third = term.expect(STATS)
    assert int(third[2]) == 0, third[0]  # a new session has no cache
    term.expect(r"you> ")
    term.type("/quit")
    assert term.close() == 0, term.screen[-2000:]


def test_chat_against_a_running_server(server):
    term = Terminal(["--url", server.url, "--api-key", KEY1, "--max-tokens", "6"])
    _conversation(term)


def test_chat_in_process(tiny_ckpt):
    term = Terminal(["--model", str(tiny_ckpt), "--device", "cpu", "--max-tokens", "6", "--num-gpu-blocks", "64",
                     "--num-cpu-blocks", "8", "--block-size", "16"])
    _conversation(term)


def test_chat_wrong_key_is_reported(server):
    term = Terminal(["--url", server.url, "--api-key", "wrong", "--max-tokens", "4"])
    term.expect(r"error: .*HTTP 401")
    assert term.close() == 2


def test_chat_needs_url_or_model():
    term = Terminal([])
    term.expect(r"error: give --url URL")
    assert term.close() == 2
