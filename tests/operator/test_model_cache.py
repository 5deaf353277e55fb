"""The model cache: one download Job into a PVC that every engine pod mounts read-only."""
import pytest

from pensieve.operator.discovery import choose_versions
from pensieve.operator.model_cache import last_progress_line, model_cache_status
from pensieve.operator.render import MODEL_SOURCE, render_children
from pensieve.operator.settings import Settings
from pensieve.operator.sizing import compute_sizing

from pdep_helpers import NODES, make_spec

from test_hardening import children

HF = {"source": {"huggingFace": {"id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "main", "tokenSecret": "hf"}}}


def cached(**cache):
    return children(model={**HF, "cache": cache})[0]


def test_rendered_pvc_job_and_engine_mount():
    ch = cached(size="20Gi", storageClassName="fast-rwx")
    pvc = ch["PersistentVolumeClaim/chat-model-cache"]["spec"]
    assert pvc == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "20Gi"}},
                   "storageClassName": "fast-rwx"}
    job = ch["Job/chat-model-fetch"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["command"][3:5] == ["Qwen/Qwen2.5-0.5B-Instruct", "main"] and c["command"][5] == "/models/model"
    marker = c["command"][6]
    assert marker.startswith("/models/.pensieve-fetched-")
    assert {"name": "model", "mountPath": "/models"} in c["volumeMounts"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in c["env"]
    assert pod["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "chat-model-cache"}}
    # Engine pods: the claim read-only, no download of their own, a wait for this source's marker.
    eng = ch["Deployment/chat-engine"]["spec"]["template"]["spec"]
    assert eng["volumes"][0] == {"name": "model", "persistentVolumeClaim": {"claimName": "chat-model-cache", "readOnly": True}}
    (init,) = eng["initContainers"]
    assert init["name"] == "wait-for-model" and init["command"][-1] == marker
    assert eng["containers"][0]["args"][:2] == ["--model", "/models/model"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in eng["containers"][0]["volumeMounts"]


def test_new_revision_new_marker_and_rwo():
    a = cached()["Job/chat-model-fetch"]["spec"]["template"]["spec"]["containers"][0]["command"][6]
    ch = children(model={"source": {"huggingFace": {"id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "v2"}},
                         "cache": {"accessMode": "ReadWriteOnce"}})[0]
    assert ch["Job/chat-model-fetch"]["spec"]["template"]["spec"]["containers"][0]["command"][6] != a
    assert ch["PersistentVolumeClaim/chat-model-cache"]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_cache_is_refused_for_local_sources():
    with pytest.raises(ValueError, match="spec.model.cache: caches a huggingFace source"):
        children(model={"source": {"pvc": {"claimName": "w"}}, "cache": {"size": "10Gi"}})
    with pytest.raises(ValueError, match="spec.model.cache.size"):
        children(model={**HF, "cache": {"size": "big"}})


def test_status_phases():
    pvc = {"metadata": {"name": "c"}, "status": {"phase": "Bound"}}
    job = {"metadata": {"name": "j", "annotations": {"pensieve.ai/model-source": "q@main"}}, "status": {"active": 1}}
    st = model_cache_status(job, pvc, "Fetching 3 files:  33%|###      | 1/3")
    assert st["phase"] == "Downloading" and st["progress"].endswith("1/3") and st["source"] == "q@main"
    assert model_cache_status(job, {"status": {"phase": "Pending"}}, None)["phase"] == "Pending"
    done = dict(job, status={"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    assert model_cache_status(done, pvc, "x")["phase"] == "Ready" and "progress" not in model_cache_status(done, pvc, "x")
    failed = dict(job, status={"failed": 7, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                                           "message": "Job has reached the specified backoff limit"}]})
    st = model_cache_status(failed, pvc, None)
    assert st["phase"] == "Failed" and "BackoffLimitExceeded" in st["message"]


def test_progress_line_from_a_redrawn_bar():
    assert last_progress_line("pensieve-fetch: downloading q@main\nFetching 3 files:   0%|\rFetching 3 files:  67%|##  | 2/3\r") \
        == "Fetching 3 files:  67%|##  | 2/3"
    assert last_progress_line("") is None


def test_degraded_when_the_download_failed():
    from pensieve.operator.status import Observed, StatusInputs, assemble_status, get_condition
    st = assemble_status(StatusInputs(generation=1, replicas_wanted=1, router_replicas_wanted=1, base={}, endpoint="e",
                                      observed=Observed(), model_cache={"phase": "Failed", "message": "the Job failed"}), None)
    assert (get_condition(st, "Degraded")["reason"], st["modelCache"]["phase"]) == ("ModelDownloadFailed", "Failed")


def test_the_download_job_is_replaced_only_for_a_new_source():
    spec = make_spec(model={**HF, "cache": {}})
    served = {("autoscaling", "v2"): ["horizontalpodautoscalers"], ("policy", "v1"): ["poddisruptionbudgets"],
              ("discovery.k8s.io", "v1"): ["endpointslices"]}
    children, _, _ = render_children(spec, compute_sizing([NODES["8xH100"]()], spec, Settings()), Settings(),
                                     choose_versions(lambda g, v: served.get((g, v))))
    ch = {c.key: c for c in children}
    job = ch["Job/chat-model-fetch"]
    # Never patched (a new engine image must not re-download); replaced when the source changes.
    assert job.create_only and job.replace_on == MODEL_SOURCE
    assert job.body["metadata"]["annotations"][MODEL_SOURCE] == "Qwen/Qwen2.5-0.5B-Instruct@main"
    assert ch["PersistentVolumeClaim/chat-model-cache"].create_only
