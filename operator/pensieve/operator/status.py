"""Conditions and the status block of a PensieveDeployment."""
from __future__ import annotations

import datetime
from typing import Any, Iterable, Mapping


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool | None, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    return {"type": type_, "status": "Unknown" if status is None else ("True" if status else "False"),
            "reason": reason, "message": message[:1024], "observedGeneration": generation or 0}


def merge_conditions(previous: Iterable[Mapping[str, Any]] | None, new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep lastTransitionTime where a condition's status did not change."""
    prev = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        p = prev.get(c["type"])
        c = dict(c)
        c["lastTransitionTime"] = p.get("lastTransitionTime", now()) if p and p.get("status") == c["status"] else now()
        out.append(c)
    return out


def get_condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    for c in (status or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def conditions_equal(a: Iterable[Mapping[str, Any]] | None, b: Iterable[Mapping[str, Any]] | None) -> bool:
    def strip(cs):
        return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                      for c in cs or [])
    return strip(a) == strip(b)
