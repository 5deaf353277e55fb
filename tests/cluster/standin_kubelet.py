"""A stand-in kubelet for the fake nodes of the cluster tier.

It polls the API server for pods the scheduler bound to its nodes and, for each,
gives the pod a real address in its own network namespace (`ip netns add` + a veth
pair; the API server rejects loopback endpoint addresses, and this way every pod
listens on its real containerPort at its own IP, as in a cluster), starts one process
for the pod's first container with the pod's environment (ConfigMap envFrom, env,
downward-API names resolved), probes the container's readinessProbe over HTTP and
reports the pod Running/Ready with its pod IP. The endpoint-slice controller then
publishes the pod in the headless Service's EndpointSlices, which is what the router
reads. A pod being deleted gets SIGTERM (the process drains), then is removed with
grace 0, as a kubelet does.

What runs is chosen per pod by a `command_for(pod, container, env) -> (argv, env)`
callable: by default `standin_app.py` (answers /health, /ready, /metrics with the
contract's metric names); `engine_command(model_dir)` runs the real engine
(`python -m pensieve.engine serve --model DIR --host 0.0.0.0 --port N`) with the pod's
env. tests/cluster/conftest.py switches with PENSIEVE_KUBELET_MODE=standin|engine.
`with_router(command_for, kubeconfig, out_dir)` runs router pods as the real
`python -m pensieve.router` (its env from the pod), with PENSIEVE_ROUTER_KUBECONFIG set
to a copy of the control plane's kubeconfig that points at the pod's veth peer address on
the host (KUBERNETES_SERVICE_HOST), which is how the pod reaches the API server.
`with_host_path_engines(command_for, out_dir)`: an engine pod whose model volume is a
hostPath holding a checkpoint runs the real engine on it (what a kubelet's mount gives).
`with_session_store(command_for, out_dir)`: pods of a managed session store run a real
redis-server with the container's arguments (where Debian's package is installed).

Cluster DNS, in the small: a pod whose environment names ``<service>.<namespace>.svc``
starts once that Service has a ready endpoint, with an /etc/hosts (``ip netns exec``
mounts /etc/netns/<ns>/hosts) mapping the name to that endpoint's pod IP.
"""
from __future__ import annotations

import base64
import datetime
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException

from pensieve.operator.kube import Conflict, NotFound, raw_request

HERE = Path(__file__).resolve().parent
CommandFor = Callable[[dict, dict, dict], "tuple[list[str], dict[str, str]]"]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def standin_command(pod: dict, container: dict, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    ports = container.get("ports") or [{"containerPort": 8000}]
    role = (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "app")
    if role == "model-fetch":  # the model cache's download Job: a stand-in download that counts itself
        repo, rev, dest, marker = container["command"][3:7]
        return [sys.executable, str(HERE / "standin_fetch.py"), repo, rev, dest, marker], env
    return [sys.executable, str(HERE / "standin_app.py"), "--role", role, "--host", "0.0.0.0",
            "--port", str(ports[0]["containerPort"])], env


def engine_command(model_dir: str, fallback: CommandFor = standin_command) -> CommandFor:
    """Engine pods run the real engine on `model_dir` (a tiny checkpoint); other pods the stand-in app."""
    def command_for(pod: dict, container: dict, env: dict[str, str]):
        if (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "engine":
            return fallback(pod, container, env)
        port = str((container.get("ports") or [{"containerPort": 8000}])[0]["containerPort"])
        env = dict(env, PENSIEVE_MODEL=model_dir, PENSIEVE_HOST="0.0.0.0", PENSIEVE_PORT=port)
        env.setdefault("PENSIEVE_CPU_CACHE_BYTES", "auto")
        env["PENSIEVE_CPU_CACHE_BYTES"] = str(min(int(env["PENSIEVE_CPU_CACHE_BYTES"]), 256 * 2**20)) \
            if env["PENSIEVE_CPU_CACHE_BYTES"].isdigit() else env["PENSIEVE_CPU_CACHE_BYTES"]
        return [sys.executable, "-m", "pensieve.engine", "serve", "--model", model_dir, "--host", "0.0.0.0",
                "--port", port], env
    return command_for


def host_path(path: str, mounts: dict[str, str]) -> str | None:
    """A container path under one of the pod's claim mounts, on the host (None: not under one)."""
    for mount, host in mounts.items():
        if path == mount or path.startswith(mount.rstrip("/") + "/"):
            return host + path[len(mount.rstrip("/")):]
    return None


def with_router(command_for: CommandFor, kubeconfig: Path, out_dir: Path) -> CommandFor:
    """Router pods run the real router; the rest as `command_for` says."""
    text = Path(kubeconfig).read_text()

    def wrapped(pod: dict, container: dict, env: dict[str, str]):
        if (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component") != "router":
            return command_for(pod, container, env)
        m = pod["metadata"]
        path = Path(out_dir) / f"{m['namespace']}_{m['name']}.kubeconfig"
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if host and port:
            path.write_text(text.replace(f"https://127.0.0.1:{port}", f"https://{host}:{port}"))
        return [sys.executable, "-m", "pensieve.router"], dict(env, PENSIEVE_ROUTER_KUBECONFIG=str(path))
    return wrapped


def _component(pod: dict) -> str:
    return (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component", "")


def with_host_path_engines(command_for: CommandFor, out_dir: Path) -> CommandFor:
    """Engine pods whose model is a hostPath checkpoint run the real engine on it; an embedded
    SQLite session store goes to a file of this pod under ``out_dir`` (its emptyDir)."""
    def wrapped(pod: dict, container: dict, env: dict[str, str]):
        if _component(pod) == "engine":
            vol = next((v for v in pod["spec"].get("volumes") or [] if v.get("name") == "model"), {})
            path = (vol.get("hostPath") or {}).get("path")
            if path and (Path(path) / "config.json").is_file():
                if env.get("PENSIEVE_SESSION_STORE", "").startswith("sqlite://"):
                    m = pod["metadata"]
                    env = dict(env, PENSIEVE_SESSION_STORE=f"sqlite:///{out_dir}/{m['namespace']}_{m['name']}.sqlite3")
                return engine_command(path)(pod, container, env)
        return command_for(pod, container, env)
    return wrapped


def with_session_store(command_for: CommandFor, out_dir: Path) -> CommandFor:
    """Managed session-store pods run redis-server with the pod's arguments, /data in ``out_dir``."""
    binary = shutil.which("redis-server")

    def wrapped(pod: dict, container: dict, env: dict[str, str]):
        if _component(pod) != "sessions" or binary is None:
            return command_for(pod, container, env)
        m = pod["metadata"]
        data = Path(out_dir) / f"{m['namespace']}_{m['name']}.data"
        data.mkdir(parents=True, exist_ok=True)
        args = list(container.get("args") or [])
        if "--dir" in args:
            args[args.index("--dir") + 1] = str(data)
        return [binary, *args], env
    return wrapped


_SERVICE_NAME = re.compile(r"\b([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.svc(?:\.cluster\.local)?\b")


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    netns: str
    proc: subprocess.Popen | None
    port: int | None
    ready_path: str | None
    ready: bool = False
    started_at: str = field(default_factory=now)
    restarts: int = 0
    terminating: bool = False
    log: Any = None
    host_ip: str = ""
    finished: bool = False  # a Job's pod whose process exited 0 (phase Succeeded)


class Net:
    """Network namespaces with a /30 veth link each: host side .1, pod side .2."""

    def __init__(self) -> None:
        self.tag = f"{random.randrange(16**3):03x}"
        self.octet = random.randrange(200, 250)
        self.next = 0
        self.lock = threading.Lock()

    @staticmethod
    def available() -> tuple[bool, str]:
        name = f"pnsvchk{os.getpid() % 100000}"
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"`ip netns add` failed: {r.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        return True, ""

    def allocate(self) -> tuple[str, str, str]:
        with self.lock:
            i = self.next
            self.next += 1
        base = i * 4
        host_ip = f"10.{self.octet}.{base // 256}.{base % 256 + 1}"
        pod_ip = f"10.{self.octet}.{base // 256}.{base % 256 + 2}"
        ns = f"pnsv{self.tag}-{i}"
        hv, pv = f"pv{self.tag}{i}h", f"pv{self.tag}{i}p"
        cmds = [["ip", "netns", "add", ns],
                ["ip", "link", "add", hv, "type", "veth", "peer", "name", pv],
                ["ip", "link", "set", pv, "netns", ns],
                ["ip", "-n", ns, "link", "set", pv, "name", "eth0"],
                ["ip", "-n", ns, "addr", "add", f"{pod_ip}/30", "dev", "eth0"],
                ["ip", "-n", ns, "link", "set", "eth0", "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{host_ip}/30", "dev", hv],
                ["ip", "link", "set", hv, "up"],
                ["ip", "-n", ns, "route", "add", "default", "via", host_ip]]
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        return ns, pod_ip, host_ip

    @staticmethod
    def release(ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    @staticmethod
    def write_hosts(ns: str, names: dict[str, str]) -> None:
        """/etc/hosts as the processes of namespace ``ns`` see it (``ip netns exec`` mounts it)."""
        if not names:
            return
        folder = Path("/etc/netns") / ns
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{ip} {name}" for name, ip in sorted(names.items())]
        (folder / "hosts").write_text("\n".join(lines) + "\n")


class StandInKubelet:
    def __init__(self, api: client.ApiClient, nodes: list[str], command_for: CommandFor = standin_command,
                 log_dir: Path | None = None, poll: float = 0.25, max_grace: float = 5.0,
                 api_server_port: int | None = None):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.nodes = set(nodes)
        self.command_for = command_for
        self.log_dir = log_dir
        self.poll = poll
        self.max_grace = max_grace
        self.api_server_port = api_server_port
        self.net = Net()
        self.pods: dict[str, PodRun] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="standin-kubelet", daemon=True)
        self.errors: list[str] = []

    def start(self) -> "StandInKubelet":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        for run in list(self.pods.values()):
            self._kill(run)

    # ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._sync()
            except Exception as e:  # noqa: BLE001 - the API server may blink; keep going
                self.errors.append(repr(e))
            self.stop_event.wait(self.poll)

    def _sync(self) -> None:
        items = raw_request(self.api, "GET", "/api/v1/pods")["items"]
        seen = set()
        for pod in items:
            node = pod["spec"].get("nodeName")
            if node not in self.nodes:
                continue
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            run = self.pods.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod, run)
                continue
            if run is None:
                self._start(pod)
            else:
                self._probe(pod, run)
        for uid in set(self.pods) - seen:  # deleted meanwhile
            self._kill(self.pods.pop(uid))

    def _resolve_env(self, pod: dict, container: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
                               "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
        if self.api_server_port:
            env["KUBERNETES_SERVICE_PORT"] = str(self.api_server_port)
        for src in container.get("envFrom") or []:
            ref = src.get("configMapRef")
            if ref:
                try:
                    cm = self.core.read_namespaced_config_map(ref["name"], ns)
                    env.update({src.get("prefix", "") + k: v for k, v in (cm.data or {}).items()})
                except ApiException:
                    if not ref.get("optional"):
                        raise
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif (e.get("valueFrom") or {}).get("fieldRef"):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": ns,
                                  "spec.nodeName": pod["spec"].get("nodeName", "")}.get(path, "")
            elif (e.get("valueFrom") or {}).get("secretKeyRef"):
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.core.read_namespaced_secret(ref["name"], ns)  # absent: the pod waits, as a kubelet's does
                if ref["key"] not in (secret.data or {}):
                    raise ApiException(status=404, reason=f"key {ref['key']} not in Secret {ref['name']}")
                env[e["name"]] = base64.b64decode(secret.data[ref["key"]]).decode()
        return env

    def _resolve_services(self, env: dict[str, str]) -> dict[str, str] | None:
        """``name.ns.svc`` names in the env -> a ready endpoint's IP; None while one has none."""
        out: dict[str, str] = {}
        for value in env.values():
            for m in _SERVICE_NAME.finditer(value):
                svc, ns = m.group(1), m.group(2)
                try:
                    ep = raw_request(self.api, "GET", f"/api/v1/namespaces/{ns}/endpoints/{svc}")
                except NotFound:
                    return None
                ips = [a["ip"] for sub in ep.get("subsets") or [] for a in sub.get("addresses") or []]
                if not ips:
                    return None
                out[m.group(0)] = ips[0]
        return out

    def _start(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        try:
            env = self._resolve_env(pod, container)
            mounts = self._mounts(pod, container)
        except ApiException:
            return  # ConfigMap, Secret or a bound claim not there yet: try again next round
        if mounts:
            env["PENSIEVE_STANDIN_MOUNTS"] = ",".join(f"{k}={v}" for k, v in mounts.items())
        if not self._init_done(pod, mounts):
            return  # an init container still waits (wait-for-model: the download's marker)
        hosts = self._resolve_services(env)
        if hosts is None:
            return  # a Service it names has no ready endpoint yet: try again next round
        ns, ip, host_ip = self.net.allocate()
        Net.write_hosts(ns, hosts)
        if self.api_server_port:
            env["KUBERNETES_SERVICE_HOST"] = host_ip
        argv, env = self.command_for(pod, container, env)
        log = open(self.log_dir / f"{meta['namespace']}_{meta['name']}.log", "ab") if self.log_dir else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        probe = container.get("readinessProbe") or {}
        http = probe.get("httpGet") or {}
        port = http.get("port")
        if isinstance(port, str):
            port = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)
        run = PodRun(meta["uid"], meta["namespace"], meta["name"], spec["nodeName"], ip, ns, proc, port,
                     http.get("path") if http else None, log=log, host_ip=host_ip)
        self.pods[run.uid] = run
        self._report(pod, run)

    def _mounts(self, pod: dict, container: dict) -> dict[str, str]:
        """mountPath -> host directory for the container's PersistentVolumeClaim mounts (hostPath
        PersistentVolumes: the stand-in's storage). An unbound claim raises, as a pod waits."""
        ns = pod["metadata"]["namespace"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes") or []
                  if v.get("persistentVolumeClaim")}
        out = {}
        for m in container.get("volumeMounts") or []:
            if m["name"] in claims:
                pvc = self.core.read_namespaced_persistent_volume_claim(claims[m["name"]], ns)
                if not pvc.spec.volume_name:
                    raise ApiException(status=409, reason=f"claim {claims[m['name']]} not bound")
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                out[m["mountPath"]] = pv.spec.host_path.path
        return out

    @staticmethod
    def _init_done(pod: dict, mounts: dict[str, str]) -> bool:
        """Init containers named wait-for-model finish when their marker file (last argument) exists."""
        for c in pod["spec"].get("initContainers") or []:
            if c["name"] == "wait-for-model":
                path = host_path(c["command"][-1], mounts)
                if path is None or not os.path.exists(path):
                    return False
        return True

    def _probe(self, pod: dict, run: PodRun) -> None:
        if run.finished:
            return
        exited = run.proc is not None and run.proc.poll() is not None and not run.terminating
        if exited and pod["spec"].get("restartPolicy", "Always") != "Always" and run.proc.returncode == 0:
            run.finished = True  # a Job's pod: done
            self._report(pod, run, phase="Succeeded")
            return
        if exited and pod["spec"].get("restartPolicy") == "Never":
            run.finished = True
            self._report(pod, run, phase="Failed")
            return
        if exited:
            run.restarts += 1  # crashed: restart it, as restartPolicy Always (or OnFailure) does
            container = pod["spec"]["containers"][0]
            env = self._resolve_env(pod, container)
            mounts = self._mounts(pod, container)
            if mounts:
                env["PENSIEVE_STANDIN_MOUNTS"] = ",".join(f"{k}={v}" for k, v in mounts.items())
            if self.api_server_port:
                env["KUBERNETES_SERVICE_HOST"] = run.host_ip
            argv, env = self.command_for(pod, container, env)
            run.proc = subprocess.Popen(["ip", "netns", "exec", run.netns, *argv], env=env, stdout=run.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            run.ready = False
            self._report(pod, run)
            return
        ready = self._check(run)
        status = pod.get("status") or {}
        if ready != run.ready or status.get("podIP") != run.ip:
            run.ready = ready
            self._report(pod, run)

    def _check(self, run: PodRun) -> bool:
        if run.proc is None or run.proc.poll() is not None:
            return False
        if not run.ready_path or not run.port:
            return True
        try:
            with urllib.request.urlopen(f"http://{run.ip}:{run.port}{run.ready_path}", timeout=1) as r:
                return 200 <= r.status < 400
        except Exception:  # noqa: BLE001
            return False

    def _report(self, pod: dict, run: PodRun, phase: str = "Running") -> None:
        container = pod["spec"]["containers"][0]
        t = now()
        ready = "True" if run.ready and phase == "Running" else "False"
        state = {"running": {"startedAt": run.started_at}} if phase == "Running" else {"terminated": {
            "exitCode": run.proc.returncode if run.proc else 0, "reason": "Completed" if phase == "Succeeded" else "Error",
            "startedAt": run.started_at, "finishedAt": t}}
        status = {
            "phase": phase,
            "hostIP": self._node_ip(run.node),
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": run.started_at,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": run.started_at},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": run.started_at},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": t},
                {"type": "Ready", "status": ready, "lastTransitionTime": t},
            ],
            "containerStatuses": [{
                "name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": run.ready,
                "started": phase == "Running", "restartCount": run.restarts,
                "containerID": f"standin://{run.proc.pid if run.proc else 0}", "state": state,
            }],
        }
        if pod["spec"].get("initContainers"):
            status["initContainerStatuses"] = [{
                "name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": run.started_at,
                                         "finishedAt": run.started_at}}} for c in pod["spec"]["initContainers"]]
        try:
            raw_request(self.api, "PATCH", f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status},
                        content_type="application/merge-patch+json")
        except NotFound:
            pass

    def _node_ip(self, node: str) -> str:
        return f"10.{self.net.octet}.255.{sorted(self.nodes).index(node) + 1}"

    def _terminate(self, pod: dict, run: PodRun | None) -> None:
        if run is not None and not run.terminating:
            run.terminating = True
            if run.proc is not None and run.proc.poll() is None:
                os.killpg(run.proc.pid, signal.SIGTERM)
            grace = min(float(pod["spec"].get("terminationGracePeriodSeconds") or 30), self.max_grace)
            threading.Thread(target=self._finish, args=(pod, run, grace), daemon=True).start()
        elif run is None:
            self._delete_now(pod)

    def _finish(self, pod: dict, run: PodRun, grace: float) -> None:
        if run.proc is not None:
            try:
                run.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill(run)
        self.pods.pop(run.uid, None)
        self._delete_now(pod)

    def _delete_now(self, pod: dict) -> None:
        m = pod["metadata"]
        try:
            raw_request(self.api, "DELETE", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                        {"gracePeriodSeconds": 0, "preconditions": {"uid": m["uid"]}})
        except (NotFound, Conflict):
            pass

    def _kill(self, run: PodRun) -> None:
        if run.proc is not None and run.proc.poll() is None:
            try:
                os.killpg(run.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            run.proc.wait()
        Net.release(run.netns)
        if run.log not in (None, subprocess.DEVNULL):
            run.log.close()
