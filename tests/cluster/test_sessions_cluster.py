"""Issue 14 on a real control plane: a PensieveDeployment with ``sessions.managed: true``
gets a session-store StatefulSet and Service it owns (the stand-in kubelet runs a real
redis-server for that pod), two real engines (a tiny checkpoint on a hostPath) share it,
and a conversation continues through the real router after its engine is lost. Turning
``managed`` off removes the store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request

import pytest
from kubernetes import client

from conftest import SAMPLE_API_KEYS, wait_for
from test_operator_cluster import SAMPLE, child_set, create_pdep, wait_ready
from test_router_cluster import ROUTER_SEL, ready_engine_pods, router_ready

pytestmark = pytest.mark.usefixtures("operator_runner")
STORE_SEL = "app.kubernetes.io/instance=chat,app.kubernetes.io/component=sessions"
MODEL = "tiny"


def turn(base: str, sid: str, content: str) -> tuple[dict, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0,
            "session_mode": "append"}
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "X-Session-ID": sid,
                                          "Authorization": f"Bearer {SAMPLE_API_KEYS[0]}"})  # the sample uses spec.auth
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read()), r.headers["X-Pensieve-Endpoint"]
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e.code} from {e.headers.get('X-Pensieve-Endpoint')}: {e.read()[:500]!r}") from None


def test_managed_store_keeps_a_session_across_the_loss_of_its_engine(api, namespace, kubelet, tiny_checkpoint):
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (scripts/bootstrap.sh installs it)")
    co, core, apps = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api)
    body = json.loads(json.dumps(SAMPLE))
    body["spec"]["autoscaling"]["enabled"] = False
    body["spec"]["model"] = {"servedName": MODEL, "source": {"hostPath": {"path": tiny_checkpoint("llama")}}}
    body["spec"]["sessions"] = {"managed": True}
    obj = create_pdep(co, namespace, body)
    wait_ready(co, namespace, "chat", timeout=180)

    # The store: a StatefulSet and a Service owned by the PensieveDeployment, its pod running.
    kids = child_set(api, namespace, "chat")
    assert {"StatefulSet/chat-sessions", "Service/chat-sessions"} <= set(kids)
    sts = apps.read_namespaced_stateful_set("chat-sessions", namespace)
    assert [(r.kind, r.uid) for r in sts.metadata.owner_references] == [("PensieveDeployment", obj["metadata"]["uid"])]
    wait_for(lambda: ready_engine_pods(core, namespace, STORE_SEL), 60, "the store pod ready")
    cm = core.read_namespaced_config_map("chat-engine", namespace)
    assert cm.data["PENSIEVE_SESSION_STORE"] == f"redis://chat-sessions.{namespace}.svc:6379/0"

    engines = wait_for(lambda: (lambda d: d if len(d) == 2 else None)(ready_engine_pods(core, namespace)), 120,
                       "2 real engines ready")
    routers = wait_for(lambda: ready_engine_pods(core, namespace, ROUTER_SEL), 60, "a ready router pod")
    base = f"http://{next(iter(routers.values())).status.pod_ip}:8080"
    wait_for(lambda: (router_ready(base) or {}).get("endpoints") == 2, 60, "the router sees 2 engines")

    sid = "outlives-its-engine"
    first, home = turn(base, sid, "remember the number seven")
    second, home2 = turn(base, sid, "what number?")
    assert home == home2 and second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

    # The engine that held the conversation is lost: its process killed, its pod gone at once.
    victim = next(name for name, p in engines.items() if f"{p.status.pod_ip}:8000" == home)
    run = next(r for r in kubelet.pods.values() if r.name == victim and r.namespace == namespace)
    proc = run.proc
    os.killpg(proc.pid, signal.SIGKILL)
    core.delete_namespaced_pod(victim, namespace, grace_period_seconds=0)
    # Gone for good (process dead, pod and its address removed) before the next turn: a turn lost
    # mid-flight is answered 502 by the router, which cannot know how far the engine got.
    wait_for(lambda: proc.poll() is not None and run.uid not in kubelet.pods, 20, "the engine and its pod gone")

    third, home3 = turn(base, sid, "and now?")
    assert home3 != home
    usage = third["usage"]["prompt_tokens_details"]
    assert usage["cached_tokens"] == 0 and usage["recomputed_tokens"] > second["usage"]["prompt_tokens"]
    key = {"Authorization": f"Bearer {SAMPLE_API_KEYS[0]}"}
    with urllib.request.urlopen(urllib.request.Request(base + f"/v1/sessions/{sid}", headers=key), timeout=10) as r:
        info = json.loads(r.read())
    assert info["num_turns"] == 3
    assert [m["content"] for m in info["messages"][::2]] == ["remember the number seven", "what number?", "and now?"]
    assert [m["content"] for m in info["messages"][1::2]] == [
        x["choices"][0]["message"]["content"] for x in (first, second, third)]

    # managed off: the operator removes the store it made; the engines move to the embedded store.
    co.patch_namespaced_custom_object("pensieve.ai", "v1alpha1", namespace, "pensievedeployments", "chat",
                                      {"spec": {"sessions": {"managed": False}}})
    wait_for(lambda: not ({"StatefulSet/chat-sessions", "Service/chat-sessions"} & set(child_set(api, namespace, "chat"))),
             60, "the managed store deleted")
    wait_for(lambda: core.read_namespaced_config_map("chat-engine", namespace).data["PENSIEVE_SESSION_STORE"]
             .startswith("sqlite:///"), 30, "engines configured for the embedded store")
