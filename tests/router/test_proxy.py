"""The router's request path against in-process fake engines (fast)."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from pensieve.router import hashing
from pensieve.router.endpoints import normalize

from fakes import FakeEngine, free_port, make_router


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def engines(n, modes=None):
    modes = modes or ["ok"] * n
    return [await FakeEngine(f"e{i}", m).start() for i, m in enumerate(modes)]


async def stop_all(stop, engs):
    await stop()
    for e in engs:
        await e.stop()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name) and not line.startswith("#"))


def test_sessions_stick_to_their_rendezvous_owner():
    async def main():
        engs = await engines(3)
        router, url, stop = await make_router([e.address for e in engs])
        addrs = [e.address for e in engs]
        async with aiohttp.ClientSession() as c:
            for turn in range(2):
                for i in range(30):
                    sid = f"s{i}"
                    async with c.post(f"{url}/v1/chat/completions", json={"messages": []},
                                      headers={"X-Session-ID": sid, "Authorization": "Bearer k"}) as r:
                        assert r.status == 200
                        assert r.headers["X-Pensieve-Endpoint"] == hashing.owner(sid, addrs)
                        assert r.headers["X-Session-ID"] == sid
                        doc = await r.json()
                        assert doc["session"] == sid
            # Body session_id works too; so do /v1/sessions/{id} paths.
            async with c.post(f"{url}/v1/chat/completions", json={"session_id": "s7", "messages": []}) as r:
                assert r.headers["X-Pensieve-Endpoint"] == hashing.owner("s7", addrs)
            async with c.get(f"{url}/v1/sessions/s9") as r:
                assert r.headers["X-Pensieve-Endpoint"] == hashing.owner("s9", addrs)
            async with c.get(f"{url}/metrics") as r:
                text = await r.text()
        # Authorization passes through unchanged.
        assert all(s["headers"].get("Authorization") == "Bearer k" for e in engs for s in e.seen[:5])
        assert metric(text, "pensieve_router_affinity_hits_total") == 62
        assert metric(text, "pensieve_router_rehomed_sessions_total") == 0
        assert metric(text, "pensieve_router_ready_endpoints") == 3
        assert 'pensieve_router_requests_total{endpoint="%s",status="200"}' % engs[0].address in text
        await stop_all(stop, engs)
    run(main())


def test_new_session_retried_on_refusal_and_dead_endpoint():
    async def main():
        engs = await engines(3, ["ok", "refuse", "ok"])
        dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
        addrs = [e.address for e in engs] + [dead]
        router, url, stop = await make_router(addrs)
        async with aiohttp.ClientSession() as c:
            landed = {}
            for i in range(40):
                sid = f"n{i}"
                async with c.post(f"{url}/v1/chat/completions", json={}, headers={"X-Session-ID": sid}) as r:
                    assert r.status == 200, await r.text()
                    landed[sid] = r.headers["X-Pensieve-Endpoint"]
            assert set(landed.values()) <= {engs[0].address, engs[2].address}
            refused_owned = [s for s in landed if hashing.owner(s, addrs) in (engs[1].address, dead)]
            assert refused_owned  # some sessions' owners refused, and they were answered anyway
            async with c.get(f"{url}/metrics") as r:
                text = await r.text()
        # Every session owned by the 503 engine was retried; the dead one was ejected
        # after its first refusal, so later sessions skipped it without a retry.
        by_503 = [s for s in refused_owned if hashing.owner(s, addrs) == engs[1].address]
        assert metric(text, "pensieve_router_retries_total") >= len(by_503) > 0
        assert 'kind="connect"' in text and 'kind="refused_503"' in text
        await stop_all(stop, engs)
    run(main())


def test_sessionless_goes_to_least_loaded_and_rehome_after_removal():
    async def main():
        engs = await engines(3)
        addrs = [e.address for e in engs]
        router, url, stop = await make_router(addrs)
        router.endpoints.acquire(addrs[0])
        router.endpoints.acquire(addrs[0])
        router.endpoints.acquire(addrs[2])
        async with aiohttp.ClientSession() as c:
            async with c.get(f"{url}/v1/models") as r:
                assert r.headers["X-Pensieve-Endpoint"] == addrs[1]
            for a in (addrs[0], addrs[0], addrs[2]):
                router.endpoints.release(a)
            sid = next(f"r{i}" for i in range(100) if hashing.owner(f"r{i}", addrs) == addrs[0])
            async with c.post(f"{url}/v1/chat/completions", json={}, headers={"X-Session-ID": sid}) as r:
                assert r.headers["X-Pensieve-Endpoint"] == addrs[0]
            # Its endpoint disappears: the session goes to its new owner.
            router.endpoints.replace({addrs[1]: True, addrs[2]: True})
            async with c.post(f"{url}/v1/chat/completions", json={}, headers={"X-Session-ID": sid}) as r:
                assert r.headers["X-Pensieve-Endpoint"] == hashing.owner(sid, addrs[1:])
            async with c.get(f"{url}/metrics") as r:
                text = await r.text()
        assert metric(text, "pensieve_router_rehomed_sessions_total") == 1
        assert metric(text, "pensieve_router_ready_endpoints") == 2
        await stop_all(stop, engs)
    run(main())


def test_sse_is_streamed_without_buffering():
    async def main():
        engs = await engines(1)
        router, url, stop = await make_router([engs[0].address])
        async with aiohttp.ClientSession() as c:
            t0 = time.monotonic()
            async with c.post(f"{url}/v1/chat/completions", json={"stream": True, "chunks": 3, "gap": 0.6}) as r:
                assert r.headers["Content-Type"].startswith("text/event-stream")
                first = await r.content.readline()
                t_first = time.monotonic() - t0
                rest = await r.read()
                t_all = time.monotonic() - t0
        assert first.startswith(b"data: {") and t_first < 0.5 < t_all, (t_first, t_all)
        assert rest.count(b"data: ") == 3 and rest.endswith(b"data: [DONE]\n\n")
        await stop_all(stop, engs)
    run(main())


def test_client_disconnect_reaches_the_engine():
    async def main():
        engs = await engines(1)
        router, url, stop = await make_router([engs[0].address])
        async with aiohttp.ClientSession() as c:
            r = await c.post(f"{url}/v1/chat/completions", json={"stream": True, "chunks": 100, "gap": 0.1})
            await r.content.readline()
            r.close()  # the client goes away mid-stream
        await asyncio.wait_for(engs[0].cancelled.wait(), 5)
        await asyncio.sleep(0.2)
        assert router.endpoints.in_flight()[engs[0].address] == 0
        await stop_all(stop, engs)
    run(main())


def test_router_side_errors_are_openai_shaped():
    async def main():
        engs = await engines(1, ["slow"])
        router, url, stop = await make_router([engs[0].address], upstream_timeout=0.5)
        async with aiohttp.ClientSession() as c:
            async with c.post(f"{url}/v1/chat/completions", json={}) as r:
                assert r.status == 504
                err = (await r.json())["error"]
                assert err["code"] == "upstream_timeout" and set(err) == {"message", "type", "param", "code"}
            router.endpoints.replace({})
            async with c.get(f"{url}/ready") as r:
                assert r.status == 503
            async with c.post(f"{url}/v1/chat/completions", json={}) as r:
                assert r.status == 503 and (await r.json())["error"]["code"] == "no_ready_endpoint"
            router.endpoints.replace({engs[0].address: True})
            async with c.get(f"{url}/ready") as r:
                assert r.status == 200
            async with c.get(f"{url}/health") as r:
                assert r.status == 200
        await stop_all(stop, engs)
    run(main())


def test_normalize():
    assert normalize("10.0.0.1", 8000) == "10.0.0.1:8000"
    assert normalize("http://h:1/") == "h:1"
    assert normalize("fd00::1", 8000) == "[fd00::1]:8000"


def test_api_keys_are_checked_at_the_router_and_passed_on():
    async def main():
        engs = await engines(1)
        router, url, stop = await make_router([e.address for e in engs], api_key="k1, k2")
        async with aiohttp.ClientSession() as c:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic k1"}, {"Authorization": "Bearer "}):
                async with c.post(f"{url}/v1/chat/completions", json={"messages": []}, headers=headers) as r:
                    assert r.status == 401
                    assert (await r.json())["error"]["code"] == "invalid_api_key"
            for key in ("k1", "k2"):
                async with c.post(f"{url}/v1/chat/completions", json={"messages": []},
                                  headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
            async with c.get(f"{url}/health") as r:  # probes and metrics stay open
                assert r.status == 200
            async with c.get(f"{url}/metrics") as r:
                assert '"401"' in await r.text()
        assert len(engs[0].seen) == 2  # refused requests never reached an engine
        assert [s["headers"]["Authorization"] for s in engs[0].seen] == ["Bearer k1", "Bearer k2"]
        await stop_all(stop, engs)
    run(main())
