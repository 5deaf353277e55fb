"""The cluster tier: a real control plane (built once and cached), fake GPU nodes, a
stand-in kubelet, the CRD, and the operator run with kopf's KopfRunner.

Switches (environment):
  PENSIEVE_KUBELET_MODE=standin (default) | engine   what pods run (see standin_kubelet.py)
  PENSIEVE_KUBELET_MODEL=DIR                           the checkpoint engine mode serves
  PENSIEVE_KUBELET_ROUTER=real (default) | standin     router pods: `python -m pensieve.router` or the stand-in app
  PENSIEVE_K8S_CACHE=DIR                               where the control-plane binaries are cached
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

# Fast resyncs for tests; Settings.from_env reads them when the operator starts.
os.environ.setdefault("PENSIEVE_OPERATOR_RESYNC_SECONDS", "5")
os.environ.setdefault("PENSIEVE_OPERATOR_DELETION_COST_SECONDS", "1")
os.environ.setdefault("PENSIEVE_OPERATOR_DELETION_COST_TIMEOUT_SECONDS", "1")
os.environ.setdefault("PENSIEVE_OPERATOR_ENGINE_IMAGE", "pensieve-engine:test")
os.environ.setdefault("PENSIEVE_OPERATOR_ROUTER_IMAGE", "pensieve-router:test")

from pensieve.operator.kube import raw_request  # noqa: E402
from k8s_controlplane import ControlPlane, ensure_binaries  # noqa: E402
from standin_kubelet import (Net, StandInKubelet, engine_command, standin_command, with_host_path_engines,  # noqa: E402
                             with_router, with_session_store)
from waiting import wait_for  # noqa: F401  (re-exported: the cluster tests import it from here)

H100 = "NVIDIA-H100-80GB-HBM3"
SAMPLE_API_KEYS = ("test-key-one", "test-key-two")  # in every test namespace's chat-api-keys Secret
FAKE_NODES = [
    # name, allocatable memory, GPUs (units), product, MiB per GPU, gpu.replicas
    ("gpu-h100-0", "2015Gi", 8, H100, 81559, None),
    ("gpu-h100-1", "2015Gi", 8, H100, 81559, None),
    ("gpu-a10-0", "62Gi", 1, "NVIDIA-A10", 23028, None),
    ("gpu-t4-0", "60Gi", 4, "Tesla-T4", 15360, 4),
]


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


def pytest_collection_modifyitems(items):
    for item in items:
        if str(HERE) in str(item.fspath):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def control_plane(request):
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is missing: the stand-in kubelet gives pods addresses with network namespaces")
    ok, why = Net.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable here ({why}); the stand-in pods need their own addresses")
    # The first build takes minutes: let its progress reach the terminal, past pytest's capture.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            bins = ensure_binaries()
    else:
        bins = ensure_binaries()
    cp = ControlPlane(bins).start()
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)
    yield cp
    cp.stop()
    print(f"[cluster] logs were in {cp.logs}", file=sys.stderr)


@pytest.fixture(scope="session")
def api(control_plane):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(control_plane.kubeconfig))


@pytest.fixture(scope="session")
def kubectl(control_plane):
    exe = control_plane.bins / "kubectl"

    def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        if not exe.exists():
            pytest.skip("kubectl was not built")
        p = subprocess.run([str(exe), f"--kubeconfig={control_plane.kubeconfig}", *args], capture_output=True, text=True,
                           input=input, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
        return p
    return run


@pytest.fixture(scope="session")
def fake_nodes(api):
    from kubernetes import client

    core = client.CoreV1Api(api)
    names = []
    for name, memory, gpus, product, mib, replicas in FAKE_NODES:
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "nvidia.com/gpu.product": product, "nvidia.com/gpu.memory": str(mib),
                  "nvidia.com/gpu.count": str(gpus // (replicas or 1)), "nvidia.com/gpu.present": "true"}
        if replicas:
            labels["nvidia.com/gpu.replicas"] = str(replicas)
            labels["nvidia.com/gpu.sharing-strategy"] = "time-slicing"
        resources = {"cpu": "96", "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus), "ephemeral-storage": "500Gi"}
        core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        core.patch_node_status(name, {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "StandInKubelet", "message": "stand-in",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "addresses": [{"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.20.2-standin", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "standin://1", "kernelVersion": "",
                         "osImage": "", "machineID": "", "systemUUID": "", "bootID": ""}}})
        names.append(name)
    return names


@pytest.fixture(scope="session")
def kubelet_command_for():
    """What the stand-in kubelet runs for a pod: override this fixture, or set
    PENSIEVE_KUBELET_MODE=engine (+ PENSIEVE_KUBELET_MODEL=DIR) to run the real engine."""
    mode = os.environ.get("PENSIEVE_KUBELET_MODE", "standin")
    if mode == "engine":
        model = os.environ.get("PENSIEVE_KUBELET_MODEL")
        if not model:
            pytest.skip("PENSIEVE_KUBELET_MODE=engine needs PENSIEVE_KUBELET_MODEL=<tiny checkpoint dir>")
        return engine_command(model)
    if mode != "standin":
        raise ValueError(f"PENSIEVE_KUBELET_MODE must be standin or engine, got {mode!r}")
    return standin_command


@pytest.fixture(scope="session")
def kubelet(api, fake_nodes, control_plane, kubelet_command_for):
    logs = control_plane.logs / "pods"
    logs.mkdir(exist_ok=True)
    router = os.environ.get("PENSIEVE_KUBELET_ROUTER", "real")
    if router not in ("real", "standin"):
        raise ValueError(f"PENSIEVE_KUBELET_ROUTER must be real or standin, got {router!r}")
    command_for = with_session_store(with_host_path_engines(kubelet_command_for, logs), logs)
    command_for = with_router(command_for, control_plane.kubeconfig, logs) if router == "real" else command_for
    # Pod-to-pod traffic (router -> engines) crosses the host between two veth links: the host
    # must forward IPv4 while the tier runs (restored afterwards).
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    fwd_before = fwd.read_text().strip() if fwd.exists() else None
    if router == "real" and fwd_before == "0":
        try:
            fwd.write_text("1\n")
        except OSError as e:
            pytest.skip(f"router pods cannot reach engine pods: enabling IPv4 forwarding failed ({e})")
    k = StandInKubelet(api, fake_nodes, command_for, log_dir=logs, api_server_port=control_plane.port).start()
    yield k
    k.stop()
    if fwd_before == "0" and fwd.read_text().strip() != "0":
        fwd.write_text("0\n")
    if k.errors:
        print(f"[cluster] stand-in kubelet errors (first 5): {k.errors[:5]}", file=sys.stderr)


@pytest.fixture(scope="session")
def crd(api):
    from kubernetes import client

    body = yaml.safe_load((ROOT / "crds" / "pensievedeployments.pensieve.ai.yaml").read_text())
    # Sent as plain JSON: the client's typed models would turn some defaults ("") into null.
    raw_request(api, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body)
    ext = client.ApiextensionsV1Api(api)
    wait_for(lambda: any(c.type == "Established" and c.status == "True"
                         for c in (ext.read_custom_resource_definition(body["metadata"]["name"]).status.conditions or [])),
             30, "CRD established")
    # The API server's discovery takes a moment to serve the new group.
    wait_for(lambda: _served(api), 30, "pensieve.ai served")
    return body


def _served(api) -> bool:
    from kubernetes import client

    try:
        client.CustomObjectsApi(api).list_cluster_custom_object("pensieve.ai", "v1alpha1", "pensievedeployments")
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(scope="session")
def operator_runner(crd, kubelet):
    """The operator, run in this process with kopf's KopfRunner (restartable by tests)."""
    handle = OperatorHandle()
    handle.start()
    yield handle
    handle.stop()


class OperatorHandle:
    def __init__(self):
        self.runner = None

    def start(self):
        from kopf.testing import KopfRunner

        self.runner = KopfRunner(["run", "--standalone", "--all-namespaces", "--verbose",
                                  "-m", "pensieve.operator.handlers"], timeout=60)
        self.runner.__enter__()
        time.sleep(1.0)

    def stop(self):
        if self.runner is not None:
            self.runner.__exit__(None, None, None)
            out = self.runner.stdout or ""
            self.runner = None
            return out
        return ""


@pytest.fixture
def namespace(api, request):
    from kubernetes import client

    core = client.CoreV1Api(api)
    import re

    name = "t-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-") + f"-{int(time.time() * 10) % 100000}"
    core.create_namespace({"metadata": {"name": name}})
    # The sample's spec.auth Secret, so that manifests/samples/pensieve.yaml applies as documented.
    core.create_namespaced_secret(name, {"metadata": {"name": "chat-api-keys"},
                                         "stringData": {"api-keys": ",".join(SAMPLE_API_KEYS)}})
    yield name
    # Free the fake GPUs for the next test: the PensieveDeployments go (their children with
    # them, by garbage collection), then the namespace.
    try:
        raw_request(api, "DELETE", f"/apis/pensieve.ai/v1alpha1/namespaces/{name}/pensievedeployments")
        raw_request(api, "DELETE", f"/api/v1/namespaces/{name}")
    except Exception as e:  # noqa: BLE001
        print(f"[cluster] cleanup of {name}: {e}", file=sys.stderr)


# API clients of the test's kube-apiserver (fixtures of every cluster test module)
@pytest.fixture
def co(api):
    from kubernetes import client

    return client.CustomObjectsApi(api)


@pytest.fixture
def apps(api):
    from kubernetes import client

    return client.AppsV1Api(api)


@pytest.fixture
def core(api):
    from kubernetes import client

    return client.CoreV1Api(api)
