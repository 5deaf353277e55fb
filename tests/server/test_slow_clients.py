"""Issue 15, item 4: slow clients are cut off, and a connection cap holds.

A server with a 3 s header timeout and a 3 s body timeout (set through the
environment, as the operator does) and a cap of 70 connections:

- 50 connections dribbling a request head one byte every 0.2 s are all
  closed within the header timeout (plus scheduling slack), while a normal
  request made meanwhile succeeds;
- 10 connections sending a complete head and then their body slowly get a
  408 ``request_timeout`` and are closed;
- past the cap a connection gets a 503 ``too_many_connections`` at once, and
  once the slow ones are gone a normal request succeeds again.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from server_helpers import MODEL, start_server, stop_server

HEADER_TIMEOUT = BODY_TIMEOUT = 3.0
CAP = 70
SLACK = 1.5  # event-loop scheduling on a loaded 2-core machine
HEAD = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Padding: " + b"a" * 200 + b"\r\n")
BODY = b'{"model": "' + MODEL.encode() + b'", "prompt": "hello", "max_tokens": 2}'


@pytest.fixture(scope="module")
def capped_server(tiny_ckpt, tmp_path_factory):
    srv = start_server(tiny_ckpt, tmp_path_factory.mktemp("logs") / "slow.log",
                       env={"PENSIEVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "PENSIEVE_BODY_TIMEOUT": str(BODY_TIMEOUT),
                            "PENSIEVE_MAX_CONNECTIONS": str(CAP)})
    yield srv
    stop_server(srv)


GIVE_UP = 10.0  # seconds a slow client keeps trying (a server without timeouts never closes it)


async def _dribble(host: str, port: int, data: bytes, prefix: bytes = b"") -> tuple[float, bytes]:
    """Send ``prefix`` at once, then ``data`` one byte every 0.2 s; returns (seconds until the server
    closed the connection, or infinity if it had not after GIVE_UP seconds; what it answered)."""
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.monotonic()
    answer = b""
    try:
        writer.write(prefix)
        for i in range(len(data)):
            if time.monotonic() - t0 > GIVE_UP:
                return float("inf"), answer
            writer.write(data[i:i + 1])
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.2)
            except asyncio.TimeoutError:
                continue
            answer += chunk
            if not chunk:
                break
        else:
            raise AssertionError("the server never closed the connection")
        while chunk:
            chunk = await reader.read(65536)
            answer += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - t0, answer


async def _normal_request(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2},
                                 timeout=30)


async def _refused(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


def test_slow_clients_are_cut_off_and_the_cap_holds(capped_server):
    url = capped_server.url
    host, port = url.removeprefix("http://").split(":")

    async def scenario():
        slow_heads = [asyncio.create_task(_dribble(host, int(port), HEAD * 10)) for _ in range(50)]
        body_head = HEAD + b"Content-Length: %d\r\n\r\n" % (len(BODY) * 10)
        slow_bodies = [asyncio.create_task(_dribble(host, int(port), BODY * 10, prefix=body_head))
                       for _ in range(10)]
        await asyncio.sleep(0.5)
        normal = await _normal_request(url)  # 61st connection, under the cap (closed once answered)
        # fill the cap with idle connections; the first one past it is refused at once
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(CAP - 60)]
        await asyncio.sleep(0.2)
        refused = await _refused(host, int(port))
        heads = await asyncio.gather(*slow_heads)
        bodies = await asyncio.gather(*slow_bodies)
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.5)
        after = await _normal_request(url)
        return normal, refused, heads, bodies, after

    normal, refused, heads, bodies, after = asyncio.run(scenario())
    head_times = [t for t, _ in heads]
    body_times = [t for t, _ in bodies]
    print(f"\n50 slow heads closed after {min(head_times):.2f}-{max(head_times):.2f}s (header timeout "
          f"{HEADER_TIMEOUT}s); 10 slow bodies after {min(body_times):.2f}-{max(body_times):.2f}s (body timeout "
          f"{BODY_TIMEOUT}s)")
    assert normal.status_code == 200, normal.text
    assert after.status_code == 200, after.text
    assert max(head_times) <= HEADER_TIMEOUT + SLACK, head_times
    assert all(answer == b"" for _, answer in heads)  # a head never completed gets no answer, just the close
    # the body's clock starts once the head is in; the unread rest is drained for at most 2 s
    assert max(body_times) <= BODY_TIMEOUT + 2.0 + SLACK, body_times
    for _, answer in bodies:
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"code": "request_timeout"' in answer, answer
    assert refused.startswith(b"HTTP/1.1 503 "), refused
    assert b'"too_many_connections"' in refused
