"""spec.sessions: the engines' session store (embedded SQLite, an external Redis from a Secret,
or a managed Valkey StatefulSet owned by the PensieveDeployment)."""
from __future__ import annotations

import argparse

import pytest

from pensieve.operator.render import engine_env, render_children
from pensieve.operator.sizing import compute_sizing
from pensieve.operator.spec import SpecError

from pdep_helpers import NODES, make_body, make_spec
from test_render import apis

OWNER = make_body()


def render(settings, **over):
    spec = make_spec(settings, **over)
    sizing = compute_sizing([NODES["8xH100"]()], spec, settings)
    children, absent, notes = render_children(spec, sizing, settings, apis(), owner=OWNER)
    return spec, sizing, {c.key: c.body for c in children}, {(a.kind, n) for a, n in absent}, notes


def engine_container(ch):
    return ch["Deployment/chat-engine"]["spec"]["template"]["spec"]["containers"][0]


def test_default_is_the_embedded_store_on_an_empty_dir(settings):
    _, _, ch, absent, notes = render(settings, replicas=1)
    env = ch["ConfigMap/chat-engine"]["data"]
    assert env["PENSIEVE_SESSION_STORE"] == "sqlite:///var/lib/pensieve/sessions/sessions.sqlite3"
    assert env["PENSIEVE_SESSION_IDLE_TIMEOUT"] == "3600" and env["PENSIEVE_MAX_SESSIONS_PER_KEY"] == "1000"
    pod = ch["Deployment/chat-engine"]["spec"]["template"]["spec"]
    assert {"name": "sessions", "emptyDir": {}} in pod["volumes"]
    assert {"name": "sessions", "mountPath": "/var/lib/pensieve/sessions"} in engine_container(ch)["volumeMounts"]
    assert {("StatefulSet", "chat-sessions"), ("Service", "chat-sessions")} <= absent
    assert not any(k.endswith("chat-sessions") for k in ch) and notes == []


def test_embedded_on_a_pvc_serves_one_replica(settings):
    _, _, ch, _, _ = render(settings, replicas=1, sessions={"embedded": {"claimName": "chat-sessions-data"}})
    pod = ch["Deployment/chat-engine"]["spec"]["template"]["spec"]
    assert {"name": "sessions", "persistentVolumeClaim": {"claimName": "chat-sessions-data"}} in pod["volumes"]
    with pytest.raises(SpecError, match="one engine replica"):
        make_spec(settings, replicas=2, sessions={"embedded": {"claimName": "x"}})


def test_several_replicas_on_the_embedded_store_are_noted(settings):
    _, _, _, _, notes = render(settings, replicas=2)
    assert any("embedded store" in n and "managed" in n for n in notes)
    _, _, _, _, notes = render(settings, replicas=1, autoscaling={"enabled": True, "maxReplicas": 3})
    assert any("up to 3 engine replicas" in n for n in notes)


def test_managed_store_is_a_statefulset_and_service_owned_by_the_deployment(settings):
    _, _, ch, absent, notes = render(settings, sessions={"managed": True, "managedStorage": "5Gi",
                                                         "managedMemory": "2Gi", "idleTimeoutSeconds": 600})
    sts, svc = ch["StatefulSet/chat-sessions"], ch["Service/chat-sessions"]
    for obj in (sts, svc):
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "sessions"
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "sessions"
    assert svc["spec"]["ports"][0]["port"] == 6379 and sts["spec"]["replicas"] == 1
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == str(3 * 2**30 // 2) and "noeviction" in args
    env = ch["ConfigMap/chat-engine"]["data"]
    assert env["PENSIEVE_SESSION_STORE"] == "redis://chat-sessions.default.svc:6379/0"
    assert env["PENSIEVE_SESSION_IDLE_TIMEOUT"] == "600"
    pod = ch["Deployment/chat-engine"]["spec"]["template"]["spec"]
    assert not any(v["name"] == "sessions" for v in pod["volumes"])
    assert not {("StatefulSet", "chat-sessions"), ("Service", "chat-sessions")} & absent and notes == []
    # without managedStorage: an emptyDir
    _, _, ch, _, _ = render(settings, sessions={"managed": True})
    sts = ch["StatefulSet/chat-sessions"]
    assert "volumeClaimTemplates" not in sts["spec"]
    assert sts["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]


def test_external_store_url_comes_from_a_secret(settings):
    _, _, ch, absent, notes = render(settings, sessions={"store": {"secretKeyRef": {"name": "redis-url"}}})
    assert "PENSIEVE_SESSION_STORE" not in ch["ConfigMap/chat-engine"]["data"]
    assert {"name": "PENSIEVE_SESSION_STORE",
            "valueFrom": {"secretKeyRef": {"name": "redis-url", "key": "url"}}} in engine_container(ch)["env"]
    assert ("StatefulSet", "chat-sessions") in absent and notes == []


@pytest.mark.parametrize("sessions, message", [
    ({"managed": True, "store": {"secretKeyRef": {"name": "x"}}}, "exclusive"),
    ({"store": {"secretKeyRef": {}}}, "secretKeyRef.name: required"),
    ({"managed": True, "managedStorage": "lots"}, "managedStorage: not a quantity"),
    ({"maxPerKey": -1}, "maxPerKey: must be >= 0"),
    ({"managed": True, "embedded": {"claimName": "x"}}, "only used without"),
])
def test_invalid_sessions_specs(settings, sessions, message):
    with pytest.raises(SpecError, match=message):
        make_spec(settings, replicas=1, sessions=sessions)


def test_users_cannot_override_the_store_through_env(settings):
    with pytest.raises(SpecError, match="PENSIEVE_SESSION_STORE is set by the operator"):
        make_spec(settings, engine={"env": [{"name": "PENSIEVE_SESSION_STORE", "value": "redis://elsewhere"}]})


@pytest.mark.parametrize("sessions", [{}, {"managed": True}])
def test_session_settings_are_accepted_by_the_engine(settings, sessions):
    from pensieve.engine.config import add_dataclass_args, dataclass_from_args
    from pensieve.engine.server import ServerConfig

    spec = make_spec(settings, replicas=1, sessions=sessions)
    env = engine_env(spec, compute_sizing([NODES["8xH100"]()], spec, settings))
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServerConfig)
    cfg = dataclass_from_args(ServerConfig, parser.parse_args([]), env)
    assert cfg.session_store == env["PENSIEVE_SESSION_STORE"] and cfg.max_sessions_per_key == 1000
