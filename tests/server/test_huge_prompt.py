"""Issue 15, item 2: a 4 MB prompt neither stalls other tenants nor leaves memory up.

The server here has a long context (2**19 tokens), so the 4 MB prompt passes
the character bound and is really tokenized (about a second of Rust work)
before its 400 context_length_exceeded: the case that used to run on the
engine thread. Meanwhile small requests must keep their unloaded latency
(within 2x), and after 10 such prompts the server's RSS must be within 50 MiB
of before. The figures are printed (run with -s to see them).
"""
from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from server_helpers import MODEL, start_server, stop_server

pytestmark = pytest.mark.slow

HUGE_CHARS = 4_000_000
SMALL = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 64,
         "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    from pensieve.engine.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("long") / "tiny-llama", "llama", seed=0,
                                max_position_embeddings=1 << 19)
    srv = start_server(ckpt, tmp_path_factory.mktemp("logs") / "long.log", "--num-gpu-blocks", "64",
                       "--max-body-bytes", str(8 << 20))
    yield srv
    stop_server(srv)


def _rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _small(client: httpx.Client, url: str) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=SMALL, timeout=120)
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def test_huge_prompt_stalls_nobody_and_frees_its_memory(long_server):
    url, pid = long_server.url, long_server.proc.pid
    huge = {"model": MODEL, "prompt": ("the cache keeps every session " * (HUGE_CHARS // 30 + 1))[:HUGE_CHARS],
            "max_tokens": 4}
    with httpx.Client() as client:
        for _ in range(3):
            _small(client, url)  # warm up
        unloaded = statistics.median(_small(client, url) for _ in range(5))

        # 1. Ten 4 MB prompts being rejected do not stall a stream of small requests.
        big_times: list[float] = []
        in_flight = threading.Event()
        done = threading.Event()

        def send_huge() -> None:
            with httpx.Client() as c:
                for _ in range(10):
                    in_flight.set()
                    big_times.append(_huge(c, url, huge))
            done.set()

        sender = threading.Thread(target=send_huge)
        sender.start()
        in_flight.wait()
        loaded = []
        while not done.is_set():
            loaded.append(_small(client, url))
        sender.join()
        assert len(big_times) == 10

        # 2. Ten more leave the server's memory where it was: measured from the steady state the
        #    first phase reached (its one-time allocations, such as the tokenizer pool's threads
        #    and buffers, are not retention), with nothing else running.
        time.sleep(1.0)
        rss_before = _rss_mib(pid)
        for _ in range(10):
            _huge(client, url, huge)
        time.sleep(1.0)
        rss_after = _rss_mib(pid)

    print(f"\nsmall request unloaded median {unloaded:.3f}s; beside 4 MB prompts: median "
          f"{statistics.median(loaded):.3f}s, max {max(loaded):.3f}s over {len(loaded)} requests; 4 MB prompt "
          f"rejected in median {statistics.median(big_times):.3f}s; RSS {rss_before:.0f} -> {rss_after:.0f} MiB "
          f"after 10 more of them")
    assert statistics.median(loaded) <= 2 * unloaded, (unloaded, loaded)
    assert abs(rss_after - rss_before) <= 50, (rss_before, rss_after)


def _huge(client: httpx.Client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    r = client.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    return time.perf_counter() - t0
