"""Manifests of a PensieveDeployment's children: pure functions of (spec, sizing, API versions).

Every child carries the `app.kubernetes.io/*` labels and an ownerReference to the
PensieveDeployment (controller=true), so garbage collection removes them with it
and the operator recognises what it owns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

from . import GROUP, KIND, VERSION
from .discovery import ApiVersions, ApiRef
from .quantity import format_bytes
from .settings import Settings
from .sizing import GPU_RESOURCE, LABEL_GPU_PRODUCT, SIZING_ANNOTATION, AppliedSize, Sizing
from .spec import PensieveSpec
from . import sessions as session_store

MANAGED_BY = "pensieve-operator"
APP = "pensieve"
ENGINE_PORT_NAME = "http"
ROUTER_CONTAINER_PORT = 8080
CONFIG_HASH = "pensieve.ai/config-hash"
# Kept in step with each engine pod's live sessions (pensieve_sessions_active) so that
# scale-down removes the emptiest pods; written by the operator's session tracker (router issue).
POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


@dataclasses.dataclass(frozen=True)
class Child:
    api: ApiRef
    body: dict[str, Any]
    create_only: bool = False  # created when missing, never patched (a PVC: its spec is the storage's)
    # With create_only: an annotation whose change replaces the object (the download Job's model
    # source: a new source is a new download; a new engine image is not).
    replace_on: str = ""

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def key(self) -> str:
        return f"{self.api.kind}/{self.name}"


def names(name: str) -> dict[str, str]:
    return {
        "engine": f"{name}-engine",           # Deployment, headless Service, ConfigMap, PDB, ServiceMonitor, NetworkPolicy
        "router": f"{name}-router",           # Deployment, ServiceAccount, RoleBinding
        "endpoint": name,                     # router Service: the chat endpoint
        "hpa": name,
    }


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": APP,
    }


def selector_labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": name, "app.kubernetes.io/component": component}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name, "engine").items()))


def endpoint_url(spec: PensieveSpec) -> str:
    port = "" if spec.router.port == 80 else f":{spec.router.port}"
    return f"http://{names(spec.name)['endpoint']}.{spec.namespace}.svc{port}"


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _meta(spec: PensieveSpec, name: str, component: str, owner: Mapping[str, Any] | None) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "namespace": spec.namespace, "labels": labels(spec.name, component)}
    if owner is not None:
        m["ownerReferences"] = [owner_reference(owner)]
    return m


def engine_env(spec: PensieveSpec, sizing: Sizing) -> dict[str, str]:
    """The engine's settings as PENSIEVE_<FLAG> variables (the engine reads every flag from its env)."""
    env = {
        "PENSIEVE_MODEL": spec.model_dir,
        "PENSIEVE_SERVED_MODEL_NAME": spec.served_name,
        "PENSIEVE_HOST": "0.0.0.0",
        "PENSIEVE_PORT": str(spec.engine.port),
        "PENSIEVE_CACHE_MODE": spec.engine.cache_mode,
        "PENSIEVE_BLOCK_SIZE": str(spec.engine.block_size),
        "PENSIEVE_EVICTION": spec.cache.eviction,
        "PENSIEVE_DTYPE": spec.engine.dtype,
        "PENSIEVE_LOAD_FORMAT": spec.engine.load_format,
        "PENSIEVE_GPU_MEMORY_UTILIZATION": repr(sizing.gpu_memory_utilization),
        "PENSIEVE_CPU_CACHE_BYTES": str(sizing.cpu_cache_bytes),
    }
    if spec.engine.max_model_len:
        env["PENSIEVE_MAX_MODEL_LEN"] = str(spec.engine.max_model_len)
    if spec.resources.tensor_parallel_size > 1:  # one engine over the pod's GPUs
        env["PENSIEVE_TENSOR_PARALLEL_SIZE"] = str(spec.resources.tensor_parallel_size)
    env.update(session_store.session_env(spec.name, spec.namespace, spec.sessions))
    return env


def config_hash(data: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(sorted(data.items()))).encode()).hexdigest()[:16]


def render_configmap(spec: PensieveSpec, sizing: Sizing, owner=None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, names(spec.name)["engine"], "engine", owner),
            "data": engine_env(spec, sizing)}


def _model_volume(spec: PensieveSpec) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(volume, mount, init containers) for the model source."""
    src = spec.source
    mount: dict[str, Any] = {"name": "model", "mountPath": spec.model_dir, "readOnly": True}
    if src.kind == "pvc":
        vol = {"name": "model", "persistentVolumeClaim": {"claimName": src.claim_name, "readOnly": True}}
        if src.sub_path:
            mount["subPath"] = src.sub_path
        return vol, mount, []
    if src.kind == "hostPath":
        return {"name": "model", "hostPath": {"path": src.path, "type": "Directory"}}, mount, []
    if spec.model_cache.enabled:
        return model_cache_volume(spec)
    # Hugging Face id: fetched into an emptyDir by an init container running the engine image.
    script = FETCH_SCRIPT
    init: dict[str, Any] = {
        "name": "fetch-model",
        "image": spec.engine.image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["python", "-c", script, src.hf_id, src.revision, spec.model_dir],
        "env": [{"name": "HF_HOME", "value": "/models/.hf-home"}, *scratch_env()],
        "volumeMounts": [{"name": "model", "mountPath": "/models"}, SCRATCH_MOUNT],
        "securityContext": container_security_context(),
    }
    if src.token_secret:
        init["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": src.token_secret, "key": "HF_TOKEN"}}})
    vol = {"name": "model", "emptyDir": {}}
    mount = {"name": "model", "mountPath": "/models", "readOnly": True}
    return vol, mount, [init]


FETCH_SCRIPT = ("import os, sys; from huggingface_hub import snapshot_download; "
                "snapshot_download(repo_id=sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])")


def termination_grace_seconds(spec: PensieveSpec, settings: Settings) -> int:
    """preStop wait + the engine's drain time + a margin for the process to exit."""
    return settings.prestop_seconds + spec.engine.drain_seconds + 5


def render_engine_deployment(spec: PensieveSpec, sizing: Sizing, settings: Settings, owner=None) -> dict[str, Any]:
    n = names(spec.name)
    sel = selector_labels(spec.name, "engine")
    vol, mount, init = _model_volume(spec)
    requests: dict[str, Any] = {"memory": format_bytes(sizing.memory_request_bytes)}
    limits: dict[str, Any] = {"memory": format_bytes(sizing.memory_limit_bytes)}
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.gpus_per_pod:
        limits[GPU_RESOURCE] = str(spec.resources.gpus_per_pod)
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        *scratch_env(), *auth_env(spec, "PENSIEVE_API_KEY"),
    ] + session_store.secret_env(spec.sessions) + [{"name": k, "value": v} for k, v in spec.engine.env]
    container = {
        "name": "engine",
        "image": spec.engine.image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["python", "-m", "pensieve.engine", "serve"],
        "args": ["--model", spec.model_dir, *spec.engine.extra_args],
        "envFrom": [{"configMapRef": {"name": n["engine"]}}],
        "env": env,
        "ports": [{"name": ENGINE_PORT_NAME, "containerPort": spec.engine.port, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}, SCRATCH_MOUNT],
        # Loading a model takes a while: the startup probe holds the others off.
        "startupProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT_NAME}, "periodSeconds": 5, "failureThreshold": 360},
        "livenessProbe": {"httpGet": {"path": "/health", "port": ENGINE_PORT_NAME}, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5},
        # /ready turns false when the engine drains (SIGTERM): the pod leaves the EndpointSlices.
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ENGINE_PORT_NAME}, "periodSeconds": 2, "failureThreshold": 1, "timeoutSeconds": 2},
        # Drain: the pod is already out of the EndpointSlices while this waits; then SIGTERM
        # makes the engine finish in-flight requests within drainSeconds.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(settings.prestop_seconds)]}}},
        "securityContext": container_security_context(),
    }
    node_selector = dict(spec.resources.node_selector)
    if spec.resources.gpu_product:
        node_selector[LABEL_GPU_PRODUCT] = spec.resources.gpu_product
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [vol, {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}, SCRATCH_VOLUME],
        "terminationGracePeriodSeconds": termination_grace_seconds(spec, settings),
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,  # engines never call the API
    }
    store_volume = session_store.embedded_volume(spec.sessions)
    if store_volume is not None:
        pod_spec["volumes"].append(store_volume[0])
        container["volumeMounts"].append(store_volume[1])
    if init:
        pod_spec["initContainers"] = init
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.resources.tolerations]
    template_meta = {"labels": labels(spec.name, "engine"),
                     "annotations": {CONFIG_HASH: config_hash(engine_env(spec, sizing))}}
    meta = _meta(spec, n["engine"], "engine", owner)
    # The applied size, kept while the spec's sizing inputs are unchanged (sizing.stable_sizing).
    meta["annotations"] = {SIZING_ANNOTATION: AppliedSize.of(spec, sizing).to_annotation()}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": sel},
            # GPUs are usually all taken: replace pods one at a time without a surge.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def render_engine_service(spec: PensieveSpec, owner=None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, names(spec.name)["engine"], "engine", owner),
        "spec": {
            "clusterIP": "None",  # headless: the router reads its EndpointSlices
            "selector": selector_labels(spec.name, "engine"),
            "ports": [{"name": ENGINE_PORT_NAME, "port": spec.engine.port, "targetPort": ENGINE_PORT_NAME, "protocol": "TCP"}],
        },
    }


def render_router_deployment(spec: PensieveSpec, owner=None) -> dict[str, Any]:
    n = names(spec.name)
    env = {
        "PENSIEVE_ROUTER_DISCOVERY": "endpointslices",
        "PENSIEVE_ROUTER_SERVICE": n["engine"],
        "PENSIEVE_ROUTER_NAMESPACE": spec.namespace,
        "PENSIEVE_ROUTER_ENGINE_PORT": str(spec.engine.port),
        "PENSIEVE_ROUTER_HOST": "0.0.0.0",
        "PENSIEVE_ROUTER_PORT": str(ROUTER_CONTAINER_PORT),
        "PENSIEVE_ROUTER_MODEL": spec.served_name,
    }
    container = {
        "name": "router",
        "image": spec.router.image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["python", "-m", "pensieve.router"],
        "env": [{"name": k, "value": v} for k, v in env.items()] + scratch_env()
        + auth_env(spec, "PENSIEVE_ROUTER_API_KEY"),
        "volumeMounts": [SCRATCH_MOUNT],
        "ports": [{"name": "http", "containerPort": ROUTER_CONTAINER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "securityContext": container_security_context(),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(spec, n["router"], "router", owner),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": selector_labels(spec.name, "router")},
            "template": {
                "metadata": {"labels": labels(spec.name, "router")},
                "spec": {"serviceAccountName": n["router"], "containers": [container], "enableServiceLinks": False,
                         "terminationGracePeriodSeconds": termination_grace_seconds_router(spec),
                         "volumes": [SCRATCH_VOLUME], "securityContext": pod_security_context(),
                         # The router watches EndpointSlices through the API: it needs its token.
                         "automountServiceAccountToken": True},
            },
        },
    }


def termination_grace_seconds_router(spec: PensieveSpec) -> int:
    return spec.engine.drain_seconds + 10  # streams through the router last as long as the engine's


def render_router_service(spec: PensieveSpec, owner=None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, names(spec.name)["endpoint"], "router", owner),
        "spec": {
            "type": spec.router.service_type,
            "selector": selector_labels(spec.name, "router"),
            "ports": [{"name": "http", "port": spec.router.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_router_rbac(spec: PensieveSpec, settings: Settings, owner=None) -> list[dict[str, Any]]:
    """The router's identity: a ServiceAccount and a RoleBinding to the ClusterRole installed with
    the operator (EndpointSlices and Services, read-only). The operator creates no Role, and its
    RBAC lets it bind this ClusterRole by name (`bind` with resourceNames) without holding what
    the ClusterRole grants."""
    n = names(spec.name)["router"]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, n, "router", owner)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(spec, n, "router", owner),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": settings.router_cluster_role},
         "subjects": [{"kind": "ServiceAccount", "name": n, "namespace": spec.namespace}]},
    ]


def render_pdb(spec: PensieveSpec, apis: ApiVersions, owner=None) -> dict[str, Any]:
    return {
        "apiVersion": apis.pdb.api_version, "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, names(spec.name)["engine"], "engine", owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(spec.name, "engine")}},
    }


def render_hpa(spec: PensieveSpec, apis: ApiVersions, owner=None) -> dict[str, Any]:
    a = spec.autoscaling
    return {
        "apiVersion": apis.hpa.api_version, "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec, names(spec.name)["hpa"], "autoscaler", owner),
        "spec": {
            # The PensieveDeployment's scale subresource: the HPA writes spec.replicas,
            # the operator carries it to the engine Deployment.
            "scaleTargetRef": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": spec.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": a.metric},
                                                  "target": {"type": "AverageValue", "averageValue": a.target}}}],
            # Sessions are state: scale down slowly.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300,
                                       "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}},
        },
    }


def render_service_monitor(spec: PensieveSpec, apis: ApiVersions, owner=None) -> dict[str, Any]:
    assert apis.service_monitor is not None
    return {
        "apiVersion": apis.service_monitor.api_version, "kind": "ServiceMonitor",
        "metadata": _meta(spec, names(spec.name)["engine"], "engine", owner),
        "spec": {
            "selector": {"matchLabels": selector_labels(spec.name, "engine")},
            "namespaceSelector": {"matchNames": [spec.namespace]},
            "endpoints": [{"port": ENGINE_PORT_NAME, "path": "/metrics", "interval": spec.monitoring.interval}],
        },
    }


def render_children(spec: PensieveSpec, sizing: Sizing, settings: Settings, apis: ApiVersions,
                    owner: Mapping[str, Any] | None = None) -> tuple[list[Child], list[tuple[ApiRef, str]], list[str]]:
    """(children to exist, (api, name) of optional children that must not exist, notes)."""
    v1 = ApiRef("", "v1", "configmaps", "ConfigMap")
    children = [
        Child(v1, render_configmap(spec, sizing, owner)),
        Child(ApiRef("", "v1", "services", "Service"), render_engine_service(spec, owner)),
        Child(ApiRef("apps", "v1", "deployments", "Deployment"), render_engine_deployment(spec, sizing, settings, owner)),
        Child(apis.pdb, render_pdb(spec, apis, owner)),
    ]
    rbac = render_router_rbac(spec, settings, owner)
    children += [
        Child(ApiRef("", "v1", "serviceaccounts", "ServiceAccount"), rbac[0]),
        Child(ROLEBINDINGS, rbac[1]),
        Child(ApiRef("apps", "v1", "deployments", "Deployment"), render_router_deployment(spec, owner)),
        Child(ApiRef("", "v1", "services", "Service"), render_router_service(spec, owner)),
    ]
    absent: list[tuple[ApiRef, str]] = []
    notes: list[str] = []
    n = names(spec.name)
    pool = apis.inference_pool if spec.inference_pool.enabled else None
    gateway_ns = (spec.inference_pool.gateway_namespace or spec.namespace) if pool else ""
    if spec.network_policy.enabled:
        children.append(Child(NETWORK_POLICIES, render_network_policy(spec, settings, owner, gateway_ns)))
    else:
        absent.append((NETWORK_POLICIES, n["engine"]))
    store_apis = (ApiRef("apps", "v1", "statefulsets", "StatefulSet"), ApiRef("", "v1", "services", "Service"))
    if spec.sessions.mode == "managed":
        store = session_store.render_managed_store(
            spec.name, spec.sessions, lambda name, component: _meta(spec, name, component, owner),
            selector_labels(spec.name, "sessions"), labels(spec.name, "sessions"))
        children += [Child(api, body) for api, body in zip(store_apis, store)]
    else:
        absent += [(api, session_store.store_name(spec.name)) for api in store_apis]
    if spec.autoscaling.enabled:
        children.append(Child(apis.hpa, render_hpa(spec, apis, owner)))
    else:
        absent.append((apis.hpa, n["hpa"]))
    if spec.monitoring.service_monitor and apis.service_monitor is not None and settings.service_monitor:
        children.append(Child(apis.service_monitor, render_service_monitor(spec, apis, owner)))
    else:
        if apis.service_monitor is not None:
            absent.append((apis.service_monitor, n["engine"]))
        if spec.monitoring.service_monitor:
            notes.append("monitoring.serviceMonitor is on but the cluster serves no monitoring.coreos.com ServiceMonitor; skipped")
    if spec.model_cache.enabled:
        children[:0] = [Child(PVCS, render_model_cache_pvc(spec, owner), create_only=True),
                        Child(JOBS, render_model_fetch_job(spec, owner), create_only=True, replace_on=MODEL_SOURCE)]
    else:
        absent += [(JOBS, f"{spec.name}-model-fetch"), (PVCS, f"{spec.name}-model-cache")]
    if pool is not None:
        children.append(Child(pool, render_inference_pool(spec, pool, owner)))
    elif apis.inference_pool is not None:
        absent.append((apis.inference_pool, n["endpoint"]))
    notes += session_store.notes(spec.replicas, spec.autoscaling.max_replicas if spec.autoscaling.enabled else None,
                                 spec.sessions)
    return children, absent, notes


# Model cache -------------------------------------------------------------------------------------------
# A Hugging Face model is downloaded once by a Job into a PersistentVolumeClaim; engine pods mount
# it read-only and wait (an init container) for the marker the Job writes when the download of
# this source (id + revision) is complete. The Job's name is fixed; a new source replaces it.
MODEL_CACHE_MOUNT = "/models"
MODEL_SOURCE = "pensieve.ai/model-source"  # on the download Job: what it downloads
# Prints progress lines the operator reads back from the Job pod's log (status.modelCache.progress).
CACHE_FETCH_SCRIPT = (
    "import os, sys, time; from huggingface_hub import snapshot_download; "
    "repo, rev, dest, marker = sys.argv[1:5]; t0 = time.time(); "
    "print(f'pensieve-fetch: downloading {repo}@{rev}', flush=True); "
    "snapshot_download(repo_id=repo, revision=rev, local_dir=dest); "
    "n = sum(len(f) for _, _, f in os.walk(dest)); "
    "open(marker, 'w').write(rev); "
    "print(f'pensieve-fetch: complete, {n} files in {time.time() - t0:.0f} s', flush=True)")
WAIT_SCRIPT = ("import os, sys, time\n"
               "while not os.path.exists(sys.argv[1]):\n"
               "    print('waiting for the model download (status.modelCache)', flush=True); time.sleep(5)")


def model_source_digest(spec: PensieveSpec) -> str:
    return hashlib.sha256(f"{spec.source.hf_id}@{spec.source.revision}".encode()).hexdigest()[:12]


def model_cache_names(spec: PensieveSpec) -> dict[str, str]:
    return {"claim": f"{spec.name}-model-cache", "job": f"{spec.name}-model-fetch",
            "marker": f"{MODEL_CACHE_MOUNT}/.pensieve-fetched-{model_source_digest(spec)}"}


def model_cache_volume(spec: PensieveSpec) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(volume, mount, init containers) of an engine pod reading the cached model."""
    n = model_cache_names(spec)
    vol = {"name": "model", "persistentVolumeClaim": {"claimName": n["claim"], "readOnly": True}}
    mount = {"name": "model", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True}
    wait = {"name": "wait-for-model", "image": spec.engine.image, "imagePullPolicy": spec.engine.image_pull_policy,
            "command": ["python", "-c", WAIT_SCRIPT, n["marker"]],
            "volumeMounts": [mount], "securityContext": container_security_context(),
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}}}
    return vol, mount, [wait]


def render_model_cache_pvc(spec: PensieveSpec, owner=None) -> dict[str, Any]:
    c = spec.model_cache
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": _meta(spec, model_cache_names(spec)["claim"], "model-cache", owner),
        "spec": {"accessModes": [c.access_mode], "resources": {"requests": {"storage": c.size}}},
    }
    if c.storage_class:
        body["spec"]["storageClassName"] = c.storage_class
    return body


def render_model_fetch_job(spec: PensieveSpec, owner=None) -> dict[str, Any]:
    n, src = model_cache_names(spec), spec.source
    env = [{"name": "HF_HOME", "value": f"{MODEL_CACHE_MOUNT}/.hf-home"}, *scratch_env()]
    if src.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": src.token_secret, "key": "HF_TOKEN"}}})
    container = {
        "name": "fetch-model", "image": spec.engine.image, "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["python", "-c", CACHE_FETCH_SCRIPT, src.hf_id, src.revision, spec.model_dir, n["marker"]],
        "env": env,
        "volumeMounts": [{"name": "model", "mountPath": MODEL_CACHE_MOUNT}, SCRATCH_MOUNT],
        "securityContext": container_security_context(),
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(spec, n["job"], "model-fetch", owner) | {
            "annotations": {MODEL_SOURCE: f"{src.hf_id}@{src.revision}"}},
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": labels(spec.name, "model-fetch")},
                "spec": {"restartPolicy": "OnFailure", "containers": [container],
                         "volumes": [{"name": "model", "persistentVolumeClaim": {"claimName": n["claim"]}}, SCRATCH_VOLUME],
                         "securityContext": pod_security_context(), "automountServiceAccountToken": False,
                         "enableServiceLinks": False}},
        },
    }


# Pod hardening ----------------------------------------------------------------------------------------
UID = 10001  # the images' user (docker/*.Dockerfile)
SCRATCH_VOLUME = {"name": "scratch", "emptyDir": {"sizeLimit": "4Gi"}}
# The root filesystem is read-only: what a process writes (Triton and tokenizer caches, temp
# files) goes to this emptyDir, which is also HOME.
SCRATCH_MOUNT = {"name": "scratch", "mountPath": "/tmp"}


def scratch_env() -> list[dict[str, Any]]:
    return [{"name": "HOME", "value": "/tmp"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
            {"name": "TRITON_CACHE_DIR", "value": "/tmp/.triton"}]


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "privileged": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


# Authentication -----------------------------------------------------------------------------------------
def auth_env(spec: PensieveSpec, variable: str) -> list[dict[str, Any]]:
    """The API keys (comma-separated) from spec.auth's Secret, as `variable`; none without spec.auth."""
    if not spec.auth.enabled:
        return []
    return [{"name": variable, "valueFrom": {"secretKeyRef": {"name": spec.auth.secret_name,
                                                              "key": spec.auth.secret_key}}}]


# NetworkPolicy --------------------------------------------------------------------------------------------
NETWORK_POLICIES = ApiRef("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
PVCS = ApiRef("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
JOBS = ApiRef("batch", "v1", "jobs", "Job")
ROLEBINDINGS = ApiRef("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding")
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server from 1.21 on


def render_network_policy(spec: PensieveSpec, settings: Settings, owner=None,
                          gateway_namespace: str = "") -> dict[str, Any]:
    """Engine pods accept traffic from this PensieveDeployment's router pods, the operator's pods
    (pod-deletion-cost reads /metrics), the monitoring namespace, and the inference gateway's
    namespace when an InferencePool is made, only."""
    sources: list[dict[str, Any]] = [{"podSelector": {"matchLabels": selector_labels(spec.name, "router")}}]
    if settings.operator_namespace:
        sources.append({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.operator_namespace}},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pensieve-operator"}}})
    monitoring = spec.network_policy.monitoring_namespace or settings.monitoring_namespace
    if monitoring:
        sources.append({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: monitoring}}})
    if gateway_namespace:  # an InferencePool: the gateway and its endpoint picker reach the engines
        sources.append({"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: gateway_namespace}}})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(spec, names(spec.name)["engine"], "engine", owner),
        "spec": {"podSelector": {"matchLabels": selector_labels(spec.name, "engine")},
                 "policyTypes": ["Ingress"],
                 "ingress": [{"from": sources,
                              "ports": [{"protocol": "TCP", "port": spec.engine.port}]}]},
    }


# Inference gateway --------------------------------------------------------------------------------------
def render_inference_pool(spec: PensieveSpec, api: ApiRef, owner=None) -> dict[str, Any]:
    """The engine pods as an InferencePool (discovery.INFERENCE_POOL's version), for a Gateway API
    Inference Extension gateway; its endpoint picker reads the engines' vllm:* metric aliases."""
    ip = spec.inference_pool
    return {
        "apiVersion": api.api_version, "kind": "InferencePool",
        "metadata": _meta(spec, names(spec.name)["endpoint"], "engine", owner),
        "spec": {"selector": {"matchLabels": selector_labels(spec.name, "engine")},
                 "targetPorts": [{"number": spec.engine.port}],
                 "endpointPickerRef": {"name": ip.endpoint_picker or f"{spec.name}-epp",
                                       "port": {"number": ip.endpoint_picker_port},
                                       "failureMode": ip.failure_mode}},
    }


def pod_deletion_cost_patch(live_sessions: int) -> dict[str, Any]:
    """Patch for an engine pod: more live sessions → costlier to delete (issue: router)."""
    return {"metadata": {"annotations": {POD_DELETION_COST: str(int(live_sessions))}}}
