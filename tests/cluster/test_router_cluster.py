"""Issue 7 on a real control plane (see conftest.py): the operator keeps each engine pod's
controller.kubernetes.io/pod-deletion-cost in step with its live sessions; the router it
deploys (the real `python -m pensieve.router`, run by the stand-in kubelet) routes chat to
the stand-in engines with session affinity, across a scale-up from 2 to 3 engines."""
from __future__ import annotations

import json
import urllib.request

import pytest
from kubernetes import client

from conftest import SAMPLE_API_KEYS, wait_for
from test_operator_cluster import SAMPLE, create_pdep, wait_ready

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
ENGINE_SEL = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=engine"
ROUTER_SEL = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=router"

pytestmark = pytest.mark.usefixtures("operator_runner")


def ready_engine_pods(core, ns, selector=ENGINE_SEL):
    return {p.metadata.name: p for p in core.list_namespaced_pod(ns, label_selector=selector).items
            if p.status.pod_ip and not p.metadata.deletion_timestamp
            and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])}


def set_sessions(ip, n):
    req = urllib.request.Request(f"http://{ip}:8000/debug/sessions", data=json.dumps({"active": n}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=2) as r:
        assert json.loads(r.read())["active"] == n


def costs(core, ns):
    return {p.metadata.name: (p.metadata.annotations or {}).get(ANNOTATION)
            for p in core.list_namespaced_pod(ns, label_selector=ENGINE_SEL).items}


def test_pod_deletion_cost_follows_live_sessions(api, namespace):
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=90)
    pods = wait_for(lambda: (lambda d: d if len(d) == 2 else None)(ready_engine_pods(core, namespace)), 30, "2 ready engine pods")
    (a, pa), (b, pb) = sorted(pods.items())
    # The stand-ins start at 0 sessions: both pods get cost 0 first.
    wait_for(lambda: costs(core, namespace) == {a: "0", b: "0"}, 20, "cost 0 on both engine pods")
    set_sessions(pa.status.pod_ip, 7)
    set_sessions(pb.status.pod_ip, 2)
    wait_for(lambda: costs(core, namespace) == {a: "7", b: "2"}, 20, "costs 7 and 2")
    set_sessions(pa.status.pod_ip, 0)
    wait_for(lambda: costs(core, namespace) == {a: "0", b: "2"}, 20, "the emptied pod's cost drops to 0")


def router_ready(base):
    try:
        with urllib.request.urlopen(base + "/ready", timeout=2) as r:
            return json.loads(r.read())
    except Exception:  # noqa: BLE001 - 503 until it sees ready engines
        return None


def chat(base, sid):
    body = {"model": "qwen2.5-0.5b-instruct", "messages": [{"role": "user", "content": f"hello from {sid}"}]}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Session-ID": sid,
                                          "Authorization": f"Bearer {SAMPLE_API_KEYS[0]}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        doc = json.loads(r.read())
        endpoint = r.headers.get("X-Pensieve-Endpoint")
    pod = doc["choices"][0]["message"]["content"].removeprefix("standin ").strip()
    return pod, endpoint


def test_router_routes_sessions_and_keeps_them_across_scale_up(api, namespace, kubelet):
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=90)
    engines = wait_for(lambda: (lambda d: d if len(d) == 2 else None)(ready_engine_pods(core, namespace)), 30, "2 engines")
    routers = wait_for(lambda: ready_engine_pods(core, namespace, ROUTER_SEL), 60, "a ready router pod")
    base = f"http://{next(iter(routers.values())).status.pod_ip}:8080"
    wait_for(lambda: (router_ready(base) or {}).get("endpoints") == 2, 30, "the router sees 2 engines")

    sessions = [f"s-{i:03d}" for i in range(30)]
    before = {}
    for sid in sessions:
        pod, endpoint = chat(base, sid)
        assert pod in engines and endpoint == f"{engines[pod].status.pod_ip}:8000", (pod, endpoint)
        before[sid] = pod
    assert set(before.values()) == set(engines), "both stand-in engines answer through the router"
    assert all(chat(base, sid)[0] == before[sid] for sid in sessions[:10]), "turn 2 lands where turn 1 did"

    co.patch_namespaced_custom_object_scale("pensieve.ai", "v1alpha1", namespace, "pensievedeployments", "chat",
                                            {"spec": {"replicas": 3}})
    engines = wait_for(lambda: (lambda d: d if len(d) == 3 else None)(ready_engine_pods(core, namespace)), 60, "3 engines")
    wait_for(lambda: (router_ready(base) or {}).get("endpoints") == 3, 30, "the router sees 3 engines")

    after = {sid: chat(base, sid)[0] for sid in sessions}
    stayed = sum(after[sid] == before[sid] for sid in sessions) / len(sessions)
    assert stayed >= 0.5, (stayed, before, after)
    # New sessions spread over all three, the new engine included.
    fresh = {chat(base, f"new-{i:03d}")[0] for i in range(30)}
    assert fresh == set(engines), fresh
