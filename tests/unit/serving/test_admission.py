"""Admission control's choice of which waiting requests to hold back (the engine test runs it live)."""

from __future__ import annotations

from types import SimpleNamespace

from kn_steer.serving.admission import request_keys, withheld
from kn_steer.serving.wire import WIRE_KEY


def _request(*keys: str | None):
    wire = {"keys": list(keys)} if keys else None
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={WIRE_KEY: wire} if wire else None))


def test_keys_are_the_distinct_non_identity_masks():
    assert request_keys(_request("p", "g")) == {"p", "g"}
    assert request_keys(_request("p", None)) == {"p"}
    assert request_keys(_request()) == frozenset()


def test_waiting_requests_are_held_once_the_slots_are_spoken_for():
    running = [_request("a", "a")]
    holding = [_request("b", None)]
    waiting = [_request(), _request("a", "c"), _request("d", "e"), _request("b", None), _request("f", None)]
    held = withheld(running, holding, waiting, limit=3)
    # a, b committed; "a,c" fits (3 masks); "d,e" would make 5: held; "b" is in use; "f" would make 4: held
    assert held == [waiting[2], waiting[4]]


def test_an_idle_engine_always_admits_the_first_request():
    waiting = [_request("x", "y"), _request("z", None)]
    assert withheld([], [], waiting, limit=2) == [waiting[1]]
