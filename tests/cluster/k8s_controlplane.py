"""A real Kubernetes control plane on this machine: Debian's etcd, and kube-apiserver,
kube-controller-manager and kube-scheduler built from Debian bookworm's kubernetes
source package (scripts/k8s/build-control-plane.sh, cached under ~/.cache/pensieve).

The API server listens on all addresses at a free port (so stand-in pods in their
network namespaces can reach it through their gateway); clients authenticate with a
static token in system:masters; RBAC is on. The controller manager runs every
controller except node lifecycle (the fake nodes have no kubelet heartbeats) and CSR
signing; it does garbage collection, Deployments → ReplicaSets → Pods, Jobs,
EndpointSlices, the HPA, and binds PersistentVolumeClaims to PersistentVolumes (tests
create hostPath volumes; the claim-protection finalizers are removed once unused).
The scheduler binds pods to the fake nodes.
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "k8s" / "build-control-plane.sh"
K8S_VERSION = "1.20.2"


def bin_dir() -> Path:
    return Path(os.environ.get("PENSIEVE_K8S_CACHE", Path.home() / ".cache" / "pensieve" / f"k8s-{K8S_VERSION}")) / "bin"


def ensure_binaries() -> Path:
    """Build (or reuse) the binaries; prints the build's progress as it goes."""
    b = bin_dir()
    if all((b / n).exists() for n in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")) and shutil.which("etcd"):
        return b
    print(f"[cluster] building the control plane with {BUILD_SCRIPT} (first run: about 6-8 minutes)", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"control-plane build failed (exit {proc.returncode}); see its output above")
    print(f"[cluster] control plane built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return Path(proc.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, bins: Path, workdir: Path | None = None):
        self.bins = bins
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pensieve-k8s-"))
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = self.workdir / "kubeconfig"

    # ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _write_kubeconfig(self) -> None:
        self.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: pensieve
  cluster: {{server: "{self.server}", insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: "{self.token}"}}
contexts:
- name: pensieve
  context: {{cluster: pensieve, user: admin, namespace: default}}
current-context: pensieve
""")

    def start(self, timeout: float = 90.0) -> "ControlPlane":
        t0 = time.time()
        wd = self.workdir
        # etcd's data on tmpfs where there is one: fsync there is free.
        shm = Path("/dev/shm")
        etcd_dir = Path(tempfile.mkdtemp(prefix="pensieve-etcd-", dir=shm if shm.is_dir() else wd))
        self._etcd_dir = etcd_dir
        c, p = free_port(), free_port()
        self._spawn("etcd", ["etcd", "--name", "pensieve", "--data-dir", str(etcd_dir),
                             "--listen-client-urls", f"http://127.0.0.1:{c}", "--advertise-client-urls", f"http://127.0.0.1:{c}",
                             "--listen-peer-urls", f"http://127.0.0.1:{p}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                             "--initial-cluster", f"pensieve=http://127.0.0.1:{p}", "--log-level", "warn",
                             "--quota-backend-bytes", str(2 * 2**30)])
        subprocess.run(["openssl", "genrsa", "-out", str(wd / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(wd / "sa.key"), "-pubout", "-out", str(wd / "sa.pub")], check=True, capture_output=True)
        (wd / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
        self._wait_tcp(c, 20, "etcd")
        self._spawn("kube-apiserver", [
            str(self.bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{c}",
            "--bind-address=0.0.0.0", f"--secure-port={self.port}", "--insecure-port=0",
            f"--cert-dir={wd / 'certs'}", f"--token-auth-file={wd / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={wd / 'sa.pub'}", f"--service-account-signing-key-file={wd / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--endpoint-reconciler-type=none",  # loopback is not a valid endpoint address
            "--advertise-address=10.96.0.1",
            # No token-controller secrets for stand-in pods; fake nodes are created Ready (no not-ready taint).
            "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
            "--allow-privileged=true", "--profiling=false", "--enable-priority-and-fairness=false",
            "--watch-cache=true", "--v=1",
        ])
        self._write_kubeconfig()
        self._wait_ready(timeout - (time.time() - t0))
        self._spawn("kube-controller-manager", [
            str(self.bins / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}",
            "--controllers=*,-nodelifecycle,-csrsigning,-csrapproving,-csrcleaner,-nodeipam,"
            "-attachdetach,-persistentvolume-expander,-ttl,-cloud-node-lifecycle,-route,-service",
            "--leader-elect=false", "--port=0", "--secure-port=0", "--use-service-account-credentials=false",
            f"--service-account-private-key-file={wd / 'sa.key'}",
            "--horizontal-pod-autoscaler-sync-period=3s", "--concurrent-gc-syncs=5",
            "--node-monitor-period=1h", "--v=1",
        ])
        self._spawn("kube-scheduler", [
            str(self.bins / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--port=0", "--secure-port=0", "--v=1",
        ])
        time.sleep(0.5)
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited at start:\n{self.tail(name)}")
        print(f"[cluster] control plane up in {time.time() - t0:.1f} s at {self.server} (logs: {self.logs})",
              file=sys.stderr, flush=True)
        return self

    def _wait_tcp(self, port: int, timeout: float, what: str) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{what} did not listen on {port}:\n{self.tail(what)}")

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        end = time.time() + max(timeout, 10)
        last = ""
        while time.time() < end:
            if self.procs["kube-apiserver"].poll() is not None:
                raise RuntimeError(f"kube-apiserver exited:\n{self.tail('kube-apiserver')}")
            try:
                req = urllib.request.Request(self.server + "/readyz", headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        return
            except Exception as e:  # noqa: BLE001 - keep polling
                last = str(e)
            time.sleep(0.25)
        raise RuntimeError(f"kube-apiserver not ready ({last}):\n{self.tail('kube-apiserver')}")

    def tail(self, name: str, n: int = 40) -> str:
        f = self.logs / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-n:]) if f.exists() else ""

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(getattr(self, "_etcd_dir", ""), ignore_errors=True)
