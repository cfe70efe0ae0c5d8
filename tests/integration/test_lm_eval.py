"""lm-evaluation-harness against the server, unchanged (issue 19 item 2).

Its ``local-completions`` model runs ``examples/lm_eval``'s MemoTrap task through the shared test
server, on the base model and on the preset model of the shipped MemoTrap context set (registered
at run time, so the shared server's own sets stay the test sets). Every choice's log-probability
lm-eval reads back is checked against kn-steer's transformers reference, unsteered and steered,
so the preset's scores differ from the base model's exactly as the set says they should.
"""

from __future__ import annotations

import math

import httpx
import pytest

from helpers.engines import SERVED_NAME, default_ref, server
from helpers.paths import ROOT, SETS

pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DATA = ROOT.parent / "shared" / "data" / "memotrap" / "test.jsonl"
SET = "smollm2-135m-context-memotrap"
PRESET_MODEL = f"{SERVED_NAME}+context-memotrap"
LIMIT = 24


@pytest.fixture(scope="module")
def srv():
    if not DATA.exists():
        pytest.skip("MemoTrap data not available")
    srv = server()
    posted = httpx.post(srv.base_url + "/v1/kn_steer/sets", content=(SETS / f"{SET}.json").read_bytes(), timeout=60)
    assert posted.status_code == 201, posted.text
    yield srv
    # the shared server's other tests expect its own test sets only
    assert httpx.delete(srv.base_url + f"/v1/kn_steer/sets/{SET}", timeout=30).status_code == 200


def _lm_eval(srv, model: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ref, _ = default_ref()
    args = (f"model={model},base_url={srv.base_url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={ref.path},num_concurrent=4,max_retries=1")
    return simple_evaluate(model="local-completions", model_args=args, tasks=["kn_steer_memotrap"],
                           task_manager=TaskManager(include_path=str(ROOT / "examples" / "lm_eval")),
                           limit=LIMIT, metadata={"data": str(DATA)}, log_samples=True)


def _per_choice(result: dict) -> dict[str, list[float]]:
    samples = result["samples"]["kn_steer_memotrap"]
    return {s["doc"]["id"]: [r[0][0] for r in s["resps"]] for s in samples}


def test_lm_eval_scores_the_base_model_and_a_preset_as_kn_steer_does(srv):
    from kn_steer.data import load_items
    from kn_steer.eval.api import HFEvaluator

    base, steered = _lm_eval(srv, SERVED_NAME), _lm_eval(srv, PRESET_MODEL)
    items = load_items(DATA, "memotrap")[:LIMIT]
    reference = HFEvaluator(sets_dir=SETS, calibrate=False)
    for result, spec in ((base, None), (steered, {"interventions": [{"set": SET}]})):
        got = _per_choice(result)
        assert len(got) == LIMIT
        expected = {s.id: list(s.logprobs) for s in reference.score(items, spec)}
        for item_id, lps in got.items():
            assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=2e-3) for a, b in zip(lps, expected[item_id])), \
                (item_id, lps, expected[item_id])
        acc = result["results"]["kn_steer_memotrap"]["acc,none"]
        wins = sum(max(range(len(v)), key=v.__getitem__) == it.faithful for it, v in
                   ((it, expected[it.id]) for it in items))
        assert acc == pytest.approx(wins / LIMIT)
    moved = [i for i in _per_choice(base) if _per_choice(base)[i] != _per_choice(steered)[i]]
    assert len(moved) == LIMIT  # the preset steers every item
