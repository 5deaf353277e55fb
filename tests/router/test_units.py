"""No torch in the router; EndpointSlice event handling from recorded events; CLI/env.
(Pod-deletion cost is the operator's: tests/operator/test_deletion_cost.py.)"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pensieve.router.config import parse_args
from pensieve.router.endpoints import EndpointSet
from pensieve.router.kube import SliceState


def test_router_never_imports_torch_or_the_engine():
    # torch, the kernels and the engine are made unimportable: the router must not need them.
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] == 'torch' or name.startswith(('pensieve.engine', 'pensieve.kernels')):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import pensieve.router, pensieve.router.main, pensieve.router.kube, pensieve.router.app\n"
            "from pensieve.router.config import parse_args\n"
            "parse_args(['--static-endpoints', '127.0.0.1:1'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_router_is_its_own_distribution_without_torch_or_the_engine():
    from importlib.metadata import requires

    deps = {re.split(r"[<>=\[; ]", d)[0].lower() for d in requires("pensieve-router") or []}
    assert "pensieve-common" in deps
    assert not deps & {"torch", "pensieve-engine", "pensieve-kernels", "triton", "transformers"}, deps
    import pensieve.router

    assert Path(pensieve.router.__file__).parts[-4:-2] == ("router", "pensieve")


def slice_(name, rv, eps, port=8000, version="v1beta1"):
    return {"apiVersion": f"discovery.k8s.io/{version}", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "resourceVersion": str(rv),
                         "labels": {"kubernetes.io/service-name": "chat-engine"}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready} if ready is not None else {},
                           "targetRef": {"kind": "Pod", "name": f"pod-{ip}"}} for ip, ready in eps]}


def test_slice_events_fold_into_the_ready_set():
    """Recorded LIST + WATCH events (v1beta1 shape, as Kubernetes 1.20 serves), then a
    410 re-list that replaces the view."""
    st = SliceState()
    st.reset([slice_("chat-engine-abc", 1, [("10.1.0.2", True), ("10.1.0.6", False)])])
    view, meta = st.view()
    assert view == {"10.1.0.2:8000": True, "10.1.0.6:8000": False}
    assert meta["10.1.0.2:8000"] == {"pod": "pod-10.1.0.2"}
    events = [
        ("MODIFIED", slice_("chat-engine-abc", 2, [("10.1.0.2", True), ("10.1.0.6", True)])),
        ("ADDED", slice_("chat-engine-def", 3, [("10.1.0.10", True)], version="v1")),  # a second slice: union
        ("MODIFIED", slice_("chat-engine-abc", 4, [("10.1.0.2", False), ("10.1.0.6", True)])),  # draining
        ("DELETED", slice_("chat-engine-def", 5, [])),
    ]
    seen = []
    for t, obj in events:
        st.apply(t, obj)
        seen.append(sorted(a for a, r in st.view()[0].items() if r))
    assert seen == [["10.1.0.2:8000", "10.1.0.6:8000"],
                    ["10.1.0.10:8000", "10.1.0.2:8000", "10.1.0.6:8000"],
                    ["10.1.0.10:8000", "10.1.0.6:8000"],
                    ["10.1.0.6:8000"]]
    st.reset([slice_("chat-engine-xyz", 9, [("10.1.0.14", None)])])  # re-list after 410; unknown = ready
    assert st.view()[0] == {"10.1.0.14:8000": True}
    # The port: --engine-port when the slice has it, else the one named http.
    assert SliceState(engine_port=9000).port_of(slice_("s", 1, [], port=8000)) == 8000


def test_endpoint_set_keeps_counts_of_endpoints_that_leave():
    es = EndpointSet()
    es.replace({"a:1": True, "b:1": True})
    es.acquire("a:1")
    es.replace({"b:1": True})
    assert es.ready_addresses() == ["b:1"] and es.in_flight()["a:1"] == 1
    es.release("a:1")
    assert "a:1" not in es.endpoints
    es.eject("b:1")
    assert es.ready_addresses() == []
    es.reinstate("b:1")
    assert es.ready_addresses() == ["b:1"]


def test_cli_reads_the_operator_env(monkeypatch):
    # What the operator's router Deployment sets (operator/pensieve/operator/render.py).
    env = {"PENSIEVE_ROUTER_DISCOVERY": "endpointslices", "PENSIEVE_ROUTER_SERVICE": "chat-engine",
           "PENSIEVE_ROUTER_NAMESPACE": "ns1", "PENSIEVE_ROUTER_ENGINE_PORT": "8000",
           "PENSIEVE_ROUTER_HOST": "0.0.0.0", "PENSIEVE_ROUTER_PORT": "8080", "PENSIEVE_ROUTER_MODEL": "m"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = parse_args([])
    assert (cfg.resolved_discovery(), cfg.service, cfg.namespace, cfg.engine_port, cfg.host, cfg.port) == \
        ("endpointslices", "chat-engine", "ns1", 8000, "0.0.0.0", 8080)
    cfg = parse_args(["--static-endpoints", "127.0.0.1:1,127.0.0.1:2", "--discovery", "auto", "--load-factor", "1.5"])
    assert cfg.resolved_discovery() == "static" and cfg.endpoint_list() == ["127.0.0.1:1", "127.0.0.1:2"]
    assert cfg.load_factor == 1.5
    cfg = parse_args(["--kubernetes-service", "x"])
    assert cfg.service == "x"


def test_static_probe_tolerates_slow_answers_but_not_refusals():
    import asyncio

    from aiohttp import web

    from pensieve.router.endpoints import EndpointSet
    from pensieve.router.static import StaticDiscovery

    async def scenario():
        delay = {"s": 0.0}

        async def ready(request):
            await asyncio.sleep(delay["s"])
            return web.json_response({"ready": True})

        app = web.Application()
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        live, dead = f"127.0.0.1:{port}", "127.0.0.1:1"
        eps = EndpointSet()
        disc = StaticDiscovery(eps, [live, dead], interval=0.0, timeout=0.2, timeout_threshold=3)
        disc.session = __import__("aiohttp").ClientSession(timeout=__import__("aiohttp").ClientTimeout(total=0.2))
        try:
            verdicts = []
            await disc.probe_all()
            verdicts.append((await disc.probe(live), await disc.probe(dead)))
            delay["s"] = 0.5  # now the live engine answers too slowly
            verdicts += [await disc.probe(live) for _ in range(3)]
            delay["s"] = 0.0
            verdicts.append(await disc.probe(live))
            return verdicts
        finally:
            await disc.session.close()
            await runner.cleanup()

    assert asyncio.run(scenario()) == [(True, False), True, True, False, True]
