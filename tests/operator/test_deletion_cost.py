"""Pod-deletion cost from the engines' live sessions: parsing, the patches, one sync round
against a fake API and real HTTP /metrics servers; no kubernetes client, no torch."""
from __future__ import annotations

import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pensieve.operator.deletion_cost import (ANNOTATION, deletion_cost_patches, engine_port, parse_sessions_active,
                                             pod_deletion_costs, ready_engine_pods, scrape_sessions_active,
                                             sync_deletion_costs)
from pensieve.operator.kube import NotFound


def test_deletion_cost_module_is_stdlib_only():
    code = ("import sys, pensieve.operator.deletion_cost; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'kubernetes', 'kopf', 'aiohttp')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pod_deletion_costs():
    text = ("# HELP pensieve_sessions_active Live sessions\n# TYPE pensieve_sessions_active gauge\n"
            "pensieve_sessions_active 7.0\npensieve_sessions_active_created 1.7e9\n")
    assert parse_sessions_active(text) == 7.0
    assert parse_sessions_active("other_metric 3\n") is None
    costs = pod_deletion_costs({"10.0.0.1": 7.0, "10.0.0.2": 0.0, "10.0.0.3": None, "10.0.0.4": 1e12})
    assert costs == {"10.0.0.1": "7", "10.0.0.2": "0", "10.0.0.4": str(2**31 - 1)}
    patches = deletion_cost_patches({"pod-a": "10.0.0.1", "pod-b": "10.0.0.2", "pod-c": "10.0.0.3"},
                                    {"10.0.0.1": 7.0, "10.0.0.2": 0.0, "10.0.0.3": None}, current={"pod-b": "0"})
    assert patches == {"pod-a": {"metadata": {"annotations": {ANNOTATION: "7"}}}}


def pod(name, ip, ready=True, port=8000, cost=None, deleting=False):
    meta = {"name": name, "annotations": {ANNOTATION: cost} if cost is not None else {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_ready_engine_pods_and_port():
    pods = [pod("a", "10.0.0.1", cost="3"), pod("b", "10.0.0.2", ready=False), pod("c", "10.0.0.3", deleting=True),
            pod("d", "", ready=True), pod("e", "10.0.0.5", port=9000)]
    assert ready_engine_pods(pods) == {"a": ("10.0.0.1", 8000, "3"), "e": ("10.0.0.5", 9000, None)}
    assert engine_port({"spec": {"containers": [{"ports": [{"containerPort": 7}]}]}}) == 7
    assert engine_port({"spec": {"containers": [{}]}}) == 8000


class FakeKube:
    def __init__(self, pods, gone=()):
        self.pods, self.gone, self.patches, self.listed = pods, set(gone), [], []

    def list(self, api, namespace=None, label_selector=None):
        self.listed.append((api.plural, namespace, label_selector))
        return self.pods

    def merge_patch(self, api, namespace, name, patch, sub=None):
        if name in self.gone:
            raise NotFound(name)
        self.patches.append((api.plural, namespace, name, patch))
        return {}


def metrics_server(values):
    """One HTTP server on loopback answering /metrics with a per-call value."""
    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = f"# TYPE pensieve_sessions_active gauge\npensieve_sessions_active {values['n']}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_scrape_over_http_skips_pods_that_do_not_answer():
    values = {"n": 4}
    srv = metrics_server(values)
    try:
        port = srv.server_address[1]
        assert scrape_sessions_active(["127.0.0.1"], port=port, timeout=0.5) == {"127.0.0.1": 4.0}
        assert scrape_sessions_active(["127.0.0.1"], port=1, timeout=0.5) == {"127.0.0.1": None}
    finally:
        srv.shutdown()


def test_sync_round_patches_only_changes():
    # Scrape is injected: pod IP -> sessions, None = did not answer.
    answers = {"10.0.0.1": 5.0, "10.0.0.2": 0.0, "10.0.0.3": None, "10.0.0.4": 2.0}

    def scrape(ips, port=None, timeout=2.0):
        assert port == 8000 and timeout == 0.3
        return {ip: answers[ip] for ip in ips}
    kube = FakeKube([pod("a", "10.0.0.1", cost="1"), pod("b", "10.0.0.2", cost="0"), pod("c", "10.0.0.3", cost="9"),
                     pod("d", "10.0.0.4"), pod("x", "10.0.0.9", ready=False)], gone={"d"})
    applied = sync_deletion_costs(kube, "ns1", "chat", timeout=0.3, scrape=scrape)
    assert kube.listed == [("pods", "ns1", "app.kubernetes.io/component=engine,app.kubernetes.io/instance=chat,"
                                           "app.kubernetes.io/name=pensieve")]
    # a changed 1 -> 5; b unchanged; c did not answer (left as it was); d vanished before its patch.
    assert kube.patches == [("pods", "ns1", "a", {"metadata": {"annotations": {ANNOTATION: "5"}}})]
    assert applied == {"a": {"metadata": {"annotations": {ANNOTATION: "5"}}}}


def test_sync_round_over_http():
    values = {"n": 3}
    srv = metrics_server(values)
    try:
        port = srv.server_address[1]
        kube = FakeKube([pod("a", "127.0.0.1", port=port), pod("b", "127.0.0.1", port=1)])
        assert sync_deletion_costs(kube, "ns", "chat", timeout=0.5) == {"a": {"metadata": {"annotations": {ANNOTATION: "3"}}}}
    finally:
        srv.shutdown()
