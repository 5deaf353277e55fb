"""`serve --tensor-parallel-size 2` (CPU, gloo): the official openai client gets the same
answers as from a one-process server, sessions reuse their cache, and SIGTERM leaves
no process behind (the engine process owns its worker rank)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import openai

from server_helpers import KEY1, MODEL, start_server, stop_server

TURNS = ["tell me about the cache", "and the GPU tier?"]


def _children(pid: int) -> list[int]:
    """Every descendant: the engine process, the worker rank it started, their helpers."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            out += [int(c)] + _children(int(c))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _conversation(server) -> tuple[list[str], list[int]]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY1, max_retries=0, timeout=60)
    texts, cached = [], []
    for text in TURNS:
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0,
            extra_headers={"X-Session-ID": "tp-session"}, extra_body={"session_mode": "append"})
        texts.append(resp.choices[0].message.content)
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
    return texts, cached


def test_serve_at_size_two_answers_like_one_process_and_exits_cleanly(tiny_ckpt, tmp_path):
    args = ("--num-gpu-blocks", "64", "--dtype", "float32")
    env = {"PENSIEVE_API_KEY": KEY1}
    one = start_server(tiny_ckpt, tmp_path / "one.log", *args, env=env)
    try:
        expected, _ = _conversation(one)
    finally:
        stop_server(one)
    two = start_server(tiny_ckpt, tmp_path / "two.log", *args, "--tensor-parallel-size", "2", env=env)
    try:
        children = _children(two.proc.pid)  # the engine process, its worker rank, resource trackers
        worker = int(re.search(r"started 1 worker process\(es\): pids \[(\d+)\]", two.log.read_text()).group(1))
        assert worker in children
        texts, cached = _conversation(two)
        assert texts == expected
        assert cached[0] == 0 and cached[1] > 0
    finally:
        stop_server(two)
    assert two.proc.returncode == 0, two.log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children), "a process of the server outlived it"
