"""The status, assembled in one place: Ready means serving; spec problems and autoscaling that
cannot act are Degraded with a reason."""
from pensieve.operator.status import Observed, Refusal, StatusInputs, assemble_status, get_condition, status_patch


def dep(replicas=2, ready=2, updated=2, available=None, gen=1, observed_gen=1):
    return {"metadata": {"generation": gen}, "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                       "availableReplicas": ready if available is None else available, "observedGeneration": observed_gen}}


def inputs(**over):
    base = dict(generation=3, replicas_wanted=2, router_replicas_wanted=1, base={"observedGeneration": 3},
                endpoint="http://chat.ns.svc", observed=Observed(engine=dep(), router=dep(1, 1, 1)))
    return StatusInputs(**(base | over))


def conds(st):
    return {t: (get_condition(st, t)["status"], get_condition(st, t)["reason"]) for t in ("Ready", "Progressing", "Degraded")}


def test_serving_and_complete():
    st = assemble_status(inputs(), None)
    assert conds(st) == {"Ready": ("True", "Serving"), "Progressing": ("False", "Complete"), "Degraded": ("False", "AsExpected")}
    assert st["replicaSummary"] == "2/2" and st["endpoint"] == "http://chat.ns.svc"


def test_refused_spec_while_old_pods_serve_is_ready_and_degraded():
    st = assemble_status(inputs(refusal=Refusal("NodesTooSmall", "no node can hold cpuCache 4Ti")), None)
    assert conds(st) == {"Ready": ("True", "Serving"), "Progressing": ("False", "NodesTooSmall"),
                         "Degraded": ("True", "NodesTooSmall")}
    assert "4Ti" in get_condition(st, "Degraded")["message"]


def test_autoscaling_that_cannot_act_is_degraded():
    hpa = {"status": {"conditions": [
        {"type": "AbleToScale", "status": "True", "reason": "SucceededGetScale"},
        {"type": "ScalingActive", "status": "False", "reason": "FailedGetPodsMetric",
         "message": "unable to get metric pensieve_num_requests_waiting"}]}}
    st = assemble_status(inputs(observed=Observed(engine=dep(), router=dep(1, 1, 1), hpa=hpa)), None)
    d = get_condition(st, "Degraded")
    assert (d["status"], d["reason"]) == ("True", "AutoscalingInactive") and "FailedGetPodsMetric" in d["message"]
    assert get_condition(st, "Ready")["status"] == "True"


def test_rollout_in_progress_still_serves():
    st = assemble_status(inputs(observed=Observed(engine=dep(ready=1, updated=1, gen=2, observed_gen=2),
                                                  router=dep(1, 1, 1))), None)
    assert conds(st)["Ready"] == ("True", "Serving") and conds(st)["Progressing"] == ("True", "RollingOut")


def test_not_serving():
    assert conds(assemble_status(inputs(observed=Observed(engine=dep(ready=0), router=dep(1, 1, 1))), None))["Ready"] == \
        ("False", "EnginesNotReady")
    assert conds(assemble_status(inputs(observed=Observed(engine=dep(), router=dep(1, 0, 1))), None))["Ready"] == \
        ("False", "RouterNotReady")
    assert conds(assemble_status(inputs(replicas_wanted=0, observed=Observed()), None))["Ready"] == ("False", "ScaledToZero")


def test_conflict_outranks_capacity_and_transition_times_kept():
    first = assemble_status(inputs(capacity_warnings=("9 replicas requested",)), None)
    assert conds(first)["Degraded"] == ("True", "InsufficientCapacity")
    second = assemble_status(inputs(conflicts=("ConfigMap/x exists",), capacity_warnings=("9",)), first)
    assert conds(second)["Degraded"] == ("True", "ChildConflict")
    assert get_condition(second, "Degraded")["lastTransitionTime"] == get_condition(first, "Degraded")["lastTransitionTime"]


def test_status_patch_nulls_removed_keys():
    prev = {"sizing": {"kept": True, "resize": {"cpuCache": "1Gi"}}, "kopf": {"progress": {}}, "endpoint": "x"}
    new = {"sizing": {"kept": False}, "endpoint": "x"}
    assert status_patch(prev, new) == {"sizing": {"kept": False, "resize": None}, "endpoint": "x"}
