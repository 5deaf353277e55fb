"""Rendezvous (highest-random-weight) hashing with bounded load.

Pure functions over endpoint names and in-flight counts: no I/O, no state, so the
unit tests check them directly and every router replica computes the same owner
for a session.

* Owner of a session: the endpoint with the highest ``weight(session, endpoint)``.
  Adding an endpoint moves only the sessions the new one wins (about 1/n of them);
  removing one moves only the sessions it owned.
* Bounded load (consistent hashing with bounded loads, Mirrokni et al.): with ``m``
  requests in flight over ``n`` endpoints, an endpoint may take the new request
  only while its in-flight count is below ``ceil(load_factor * (m + 1) / n)``.
  Candidates are tried in the session's rendezvous order, so a hot session spills
  to its second choice, and so on. The ceiling guarantees that some endpoint is
  always under the bound (the least loaded one holds at most m/n), and after the
  assignment no endpoint holds more than ``load_factor * mean + 1``.
* Load floor: below ``load_floor`` requests in flight an endpoint is never "over the
  bound". At low load the ratio is noise (with 3 requests in flight, one endpoint
  holding 2 is "1.5 x the mean"), and moving a session off its engine costs a full
  re-prefill of its history, so a bounded-load spill must mean real overload. An
  engine batches many sequences; the default floor (8) is small against that.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Mapping, Sequence

DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_LOAD_FLOOR = 8


def weight(session_id: str, endpoint: str) -> int:
    """A stable 64-bit score (Python's hash() is salted per process; this must agree
    across router replicas and restarts)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(session_id.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(endpoint.encode())
    return int.from_bytes(h.digest(), "big")


def rank(session_id: str, endpoints: Iterable[str]) -> list[str]:
    """Endpoints in the session's preference order (owner first); ties broken by name."""
    return sorted(endpoints, key=lambda e: (-weight(session_id, e), e))


def owner(session_id: str, endpoints: Iterable[str]) -> str | None:
    best, best_w = None, -1
    for e in endpoints:
        w = weight(session_id, e)
        if w > best_w or (w == best_w and best is not None and e < best):
            best, best_w = e, w
    return best


def capacity(total_in_flight: int, n_endpoints: int, load_factor: float = DEFAULT_LOAD_FACTOR,
             load_floor: int = 0) -> int:
    """The in-flight count an endpoint must stay below to take one more request."""
    if n_endpoints <= 0:
        return 0
    return max(1, load_floor, math.ceil(load_factor * (total_in_flight + 1) / n_endpoints))


def least_loaded(endpoints: Sequence[str], in_flight: Mapping[str, int]) -> list[str]:
    """Endpoints from least to most loaded (ties by name, so the choice is deterministic)."""
    return sorted(endpoints, key=lambda e: (in_flight.get(e, 0), e))


def choose(session_id: str | None, endpoints: Sequence[str], in_flight: Mapping[str, int],
           load_factor: float = DEFAULT_LOAD_FACTOR, prefer: str | None = None,
           load_floor: int = 0) -> list[str]:
    """Every ready endpoint, in the order the router should try them.

    Without a session: least loaded first. With one: rendezvous order, with the
    endpoints at or over the bound moved to the back (still least loaded first, as a
    last resort). ``prefer`` (where this session was last served, if still ready and
    under the bound) goes first: a session that was spilled off its owner stays
    where its cache now is instead of bouncing back and forth.
    """
    if not endpoints:
        return []
    if session_id is None:
        return least_loaded(endpoints, in_flight)
    cap = capacity(sum(in_flight.get(e, 0) for e in endpoints), len(endpoints), load_factor, load_floor)
    order = rank(session_id, endpoints)
    under = [e for e in order if in_flight.get(e, 0) < cap]
    over = least_loaded([e for e in order if in_flight.get(e, 0) >= cap], in_flight)
    if prefer is not None and prefer in under:
        under.remove(prefer)
        under.insert(0, prefer)
    return under + over
