"""Data-parallel localization on Ray (a local cluster of 2 workers): the one-process set, resumable.

Workers get the tiny model from ``helpers.workers.TinyLoader``; only the driver writes the
checkpoint. Asserted: the same set, scores and per-example results as one process; a worker that
dies mid-run loses only its own example and a re-run finishes from the checkpoint with the same set.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT
from helpers.tiny import build_tiny_model
from helpers.tokenizer import word_tokenizer
from helpers.workers import (ExitOnExample, FailingLoader, RaiseOnExample, TinyLoader, assert_close,
                             assert_same_neurons)

from kn_steer.errors import DataError, KnSteerError
from kn_steer.localize import IRCANExample, RunInfo, get_method, run_localization
from kn_steer.localize.distributed import RayScorer
from kn_steer.localize.methods.ircan import IRCANParams
from kn_steer.localize.runner import checkpoint_path, examples_path
from kn_steer.models import ModelRef
from kn_steer.sets.format import NeuronSet

QUOTE = 'write a quote that ends in the word "{}": '
EXAMPLES = [
    IRCANExample(id="m0", context=QUOTE.format("kings"), prompt="no man can serve two", target=" kings"),
    IRCANExample(id="m1", context=QUOTE.format("wise"), prompt="penny wise , pound", target=" wise"),
    IRCANExample(id="m2", context=QUOTE.format("masters"), prompt="no man can serve two", target=" masters"),
    IRCANExample(id="m3", context=QUOTE.format("foolish"), prompt="penny wise , pound", target=" foolish"),
    IRCANExample(id="c0", context="the capital of france is rome . ", prompt="the capital of france is",
                 target=" rome"),
    IRCANExample(id="c1", context="the official language of brazil is greek . ",
                 prompt="the official language of brazil is", target=" greek"),
]
PARAMS = IRCANParams(steps=3, top_k=5, count=6)
SPEC = get_method("ircan")
INFO = RunInfo(name="ctx", data_file=None)

pytestmark = pytest.mark.slow  # a local Ray cluster and worker processes: 8-17 s per test here


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray cluster for the module (2 CPUs); workers import this tree and ``helpers``."""
    import ray

    path = os.pathsep.join(p for p in (str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[NeuronSet, dict]:
    """The one-process run: its set and its per-example results by id.

    With the workers' torch thread count (Ray gives a 1-CPU actor 1 thread): another count sums
    in another order. Even then another process may differ in the last bits (~1e-7 relative),
    so scores are compared to 1e-5."""
    out = tmp_path_factory.mktemp("one") / "ctx.json"
    model, tok = TinyLoader()()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        neuron_set = run_localization(SPEC, PARAMS, EXAMPLES, model, tok, _ref(), out, INFO, progress=False)
    finally:
        torch.set_num_threads(threads)
    return neuron_set, _per_example(out)


def _ref() -> ModelRef:
    return ModelRef(name="tiny", path=Path("."), fingerprint="tiny-llama")


def _per_example(out: Path) -> dict:
    lines = examples_path(out).read_text().splitlines()
    return {entry["id"]: entry["result"] for entry in map(json.loads, lines[1:])}


def _run_workers(spec, out: Path, scorer: RayScorer, **kw) -> NeuronSet:
    config = build_tiny_model("llama").config  # the driver holds no model, only its config
    return run_localization(spec, PARAMS, EXAMPLES, None, word_tokenizer(), _ref(), out, INFO,
                            progress=False, scorer=scorer, config=config, **kw)


def _same_set(a: NeuronSet, b: NeuronSet) -> None:
    assert_same_neurons(a, b)
    assert a.method == b.method and a.model == b.model and a.operation == b.operation


def test_two_workers_write_the_one_process_set(ray_session, reference, tmp_path: Path) -> None:
    expected, per_example = reference
    out = tmp_path / "ctx.json"
    scorer = RayScorer(TinyLoader(), workers=2)
    written = _run_workers(SPEC, out, scorer)
    _same_set(written, expected)
    _same_set(NeuronSet.load(out), expected)
    assert_close(_per_example(out), per_example)  # every example's neurons and scores
    assert written.metrics["resumed_examples"] == 0 and not checkpoint_path(out).exists()
    # two actors of their own, not this process
    assert len(set(scorer.worker_pids)) == 2 and os.getpid() not in scorer.worker_pids

    # nothing left to compute: no worker starts (this loader would fail)
    again = _run_workers(SPEC, out, RayScorer(FailingLoader(), workers=2))
    assert again.metrics["resumed_examples"] == len(EXAMPLES)
    assert_same_neurons(again, written, metrics=False)


def test_a_killed_worker_loses_only_its_example_and_a_rerun_finishes(ray_session, reference,
                                                                     tmp_path: Path) -> None:
    expected, per_example = reference
    out = tmp_path / "ctx.json"
    dying = replace(SPEC, score=ExitOnExample(SPEC.score, "m2"))  # the worker process exits on m2
    with pytest.raises(KnSteerError, match="1 of 6 examples were not scored: 1 of 2 localization workers died"):
        _run_workers(dying, out, RayScorer(TinyLoader(), workers=2))
    partial = checkpoint_path(out)
    assert not out.exists()
    saved = [json.loads(line)["id"] for line in partial.read_text().splitlines()[1:]]
    assert sorted(saved) == ["c0", "c1", "m0", "m1", "m3"]  # the other worker finished the rest

    resumed = _run_workers(SPEC, out, RayScorer(TinyLoader(), workers=2))
    assert resumed.metrics.pop("resumed_examples") == 5
    assert expected.metrics["resumed_examples"] == 0
    assert_same_neurons(resumed, expected, metrics=False)
    assert_close(_per_example(out), per_example)


def test_a_method_error_in_a_worker_is_raised_as_in_one_process(ray_session, tmp_path: Path) -> None:
    out = tmp_path / "ctx.json"
    failing = replace(SPEC, score=RaiseOnExample(SPEC.score, "m1"))
    with pytest.raises(DataError, match="example 'm1' cannot be scored"):
        _run_workers(failing, out, RayScorer(TinyLoader(), workers=2))
    ids = [json.loads(line)["id"] for line in checkpoint_path(out).read_text().splitlines()[1:]]
    assert "m1" not in ids  # what finished before the error stays checkpointed


def test_bad_worker_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KnSteerError, match="at least 1"):
        RayScorer(TinyLoader(), workers=0)
    with pytest.raises(KnSteerError, match="corpus method"):
        run_localization("relation", get_method("relation").parse_params({"relation": "P36"}), None, None,
                         None, _ref(), tmp_path / "x.json", INFO, scorer=RayScorer(TinyLoader(), workers=1))
