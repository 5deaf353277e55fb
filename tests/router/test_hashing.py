"""Rendezvous hashing and bounded load (pure functions)."""
from __future__ import annotations

import random

from pensieve.router import hashing

SESSIONS = [f"session-{i}" for i in range(10_000)]
THREE = ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]


def owners(endpoints):
    return {s: hashing.owner(s, endpoints) for s in SESSIONS}


def test_owner_is_stable_and_first_in_rank():
    before = owners(THREE)
    assert before == owners(list(reversed(THREE)))  # order of discovery does not matter
    for s in SESSIONS[:200]:
        assert hashing.rank(s, THREE)[0] == before[s]
    counts = {e: sum(1 for o in before.values() if o == e) for e in THREE}
    assert all(abs(c - 10_000 / 3) < 300 for c in counts.values()), counts


def test_adding_a_fourth_endpoint_moves_about_a_quarter_all_to_it():
    before = owners(THREE)
    new = "10.0.0.4:8000"
    after = owners(THREE + [new])
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert 0.22 * len(SESSIONS) < len(moved) < 0.28 * len(SESSIONS), len(moved)
    assert all(after[s] == new for s in moved)  # nothing moves between the old three


def test_removing_one_moves_only_its_own_sessions():
    four = THREE + ["10.0.0.4:8000"]
    before = owners(four)
    gone = four[1]
    after = owners([e for e in four if e != gone])
    moved = {s for s in SESSIONS if before[s] != after[s]}
    assert moved == {s for s in SESSIONS if before[s] == gone}
    # ... and they spread over the others.
    assert {after[s] for s in moved} == set(four) - {gone}


def simulate(load_factor, steps=20_000, check=True):
    """A few hot sessions send 80% of the requests; requests finish at random."""
    rng = random.Random(0)
    eps = [f"10.0.1.{i}:8000" for i in range(5)]
    in_flight = {e: 0 for e in eps}
    active: list[str] = []
    hot = [f"hot-{i}" for i in range(3)]
    peak_share = []
    for step in range(steps):
        if active and rng.random() < 0.45:  # a request finishes
            e = active.pop(rng.randrange(len(active)))
            in_flight[e] -= 1
            continue
        sid = rng.choice(hot) if rng.random() < 0.8 else f"cold-{rng.randrange(1000)}"
        e = hashing.choose(sid, eps, in_flight, load_factor)[0]
        in_flight[e] += 1
        active.append(e)
        mean = sum(in_flight.values()) / len(eps)
        if check:  # the endpoint that took it is within the bound, whatever the skew
            assert in_flight[e] <= load_factor * mean + 1, (step, in_flight)
        peak_share.append(max(in_flight.values()) / sum(in_flight.values()))
    return sum(peak_share[1000:]) / len(peak_share[1000:])


def test_bounded_load_under_a_skewed_workload():
    bounded = simulate(1.25)
    unbounded = simulate(1e9, check=False)
    # Without the bound the hot sessions' owners carry most of the load.
    assert unbounded > 0.35 and bounded < 0.3, (bounded, unbounded)


def test_bound_spills_in_rank_order_and_prefers_previous_endpoint():
    eps = THREE
    sid = "abc"
    order = hashing.rank(sid, eps)
    # The owner is over the bound: the second choice gets it.
    in_flight = {order[0]: 10, order[1]: 0, order[2]: 0}
    assert hashing.choose(sid, eps, in_flight)[0] == order[1]
    # Where the session was last served goes first when it is under the bound ...
    assert hashing.choose(sid, eps, {e: 0 for e in eps}, prefer=order[2])[0] == order[2]
    # ... but not when it is over.
    assert hashing.choose(sid, eps, {order[2]: 10}, prefer=order[2])[0] == order[0]
    # Every endpoint is still listed (retries), the over-bound ones last.
    assert sorted(hashing.choose(sid, eps, in_flight)) == sorted(eps)
    assert hashing.choose(sid, eps, in_flight)[-1] == order[0]


def test_sessionless_goes_to_the_least_loaded():
    in_flight = {THREE[0]: 3, THREE[1]: 1, THREE[2]: 2}
    assert hashing.choose(None, THREE, in_flight) == [THREE[1], THREE[2], THREE[0]]
    assert hashing.choose(None, [], {}) == []
    assert hashing.capacity(0, 3, 1.25) == 1


def test_load_floor_keeps_sessions_home_at_low_load():
    sid = "abc"
    order = hashing.rank(sid, THREE)
    light = {order[0]: 3, order[1]: 0, order[2]: 0}  # "3x the mean", but only 3 requests
    assert hashing.choose(sid, THREE, light, 1.25)[0] == order[1]
    assert hashing.choose(sid, THREE, light, 1.25, load_floor=8)[0] == order[0]
    heavy = {order[0]: 30, order[1]: 5, order[2]: 5}
    assert hashing.choose(sid, THREE, heavy, 1.25, load_floor=8)[0] == order[1]
