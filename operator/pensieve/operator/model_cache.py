"""status.modelCache: the model download Job's state, read back (render.py makes the PVC and Job).

Phases: Pending (the claim is not bound yet), Downloading, Ready (the Job succeeded: every
engine pod, rollouts and scale-ups included, mounts the downloaded files), Failed (the Job gave
up: Degraded ModelDownloadFailed). `progress` is the last line the download printed, read from
the Job pod's log where the API server can reach its kubelet (pods/log); absent otherwise.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .discovery import ApiRef
from .kube import ApiError, NotFound

PODS = ApiRef("", "v1", "pods", "Pod")
_LINE = re.compile(r"[\r\n]+")


def model_cache_status(job: Mapping[str, Any] | None, pvc: Mapping[str, Any] | None,
                       progress: str | None) -> dict[str, Any]:
    meta = (job or {}).get("metadata") or {}
    st = (job or {}).get("status") or {}
    out: dict[str, Any] = {"claim": ((pvc or {}).get("metadata") or {}).get("name", ""),
                           "job": meta.get("name", ""),
                           "source": (meta.get("annotations") or {}).get("pensieve.ai/model-source", "")}
    conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds or int(st.get("succeeded") or 0) > 0:
        out.update(phase="Ready", message=f"downloaded; completed {st.get('completionTime', '')}".strip())
    elif "Failed" in conds:
        c = conds["Failed"]
        out.update(phase="Failed", message=f"the model download Job failed: {c.get('reason', '')}: {c.get('message', '')}")
    elif ((pvc or {}).get("status") or {}).get("phase") not in (None, "Bound"):
        out.update(phase="Pending", message=f"waiting for the claim to bind ({(pvc or {}).get('status', {}).get('phase')})")
    else:
        tries = int(st.get("failed") or 0)
        out.update(phase="Downloading", message=f"started {st.get('startTime', 'not yet')}"
                   + (f"; {tries} failed attempts" if tries else ""))
    if progress and out["phase"] != "Ready":
        out["progress"] = progress
    return out


def last_progress_line(log_text: str) -> str | None:
    """The last non-empty line or carriage-return segment (download bars redraw with \\r)."""
    parts = [p.strip() for p in _LINE.split(log_text or "") if p.strip()]
    return parts[-1][:300] if parts else None


def fetch_progress(kube: Any, namespace: str, job: str) -> str | None:
    """The download's last printed line, from the newest pod of the Job; None when unreadable."""
    try:
        pods = kube.list(PODS, namespace, label_selector=f"job-name={job}")
        if not pods:
            return None
        newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
        text = kube.text(PODS.path(namespace, newest["metadata"]["name"], "log"), query=[("tailLines", 5)])
        return last_progress_line(text)
    except (ApiError, NotFound, OSError, ValueError):
        return None  # no kubelet to proxy the log (or no rights): phase and message still say enough
