"""One request must never change another's output: the largest doses the server accepts, alone,
concurrent and in mixed batches, on a real engine whose few KV blocks are reused all the time; and
more distinct masks than the bank has slots, which the scheduler admits a few at a time.

The reproducer of issue #10 scaled every neuron of layer 5 by 1e39 (finite as JSON, infinite in
float32); its non-finite keys/values were written into KV blocks that later requests reused, and
their attention read the stale part of a block with weight 0 (0 x NaN = NaN). Such a dose is now
refused, the largest accepted doses keep every activation finite, and the hook replaces anything
non-finite. Here: every unsteered output after (and beside) hostile traffic equals a clean run.
"""

from __future__ import annotations

import math

import pytest

from helpers.engines import ENGINE_KW, default_ref, greedy, make_llm, shutdown

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

KV_BLOCKS = 24  # x 128 tokens: every long request reuses blocks that hostile requests wrote
STORY = ("In a quiet laboratory at the edge of the city, a team of researchers spent years studying how "
         "small changes in temperature affect the growth of crystals. ")
PLAIN = ["The capital of France is", "Water boils at", STORY * 3 + "The most surprising result was",
         STORY * 4 + "In the end, the team", STORY * 2 + "Their funding came from"]
ALL = [[layer, i] for layer in range(30) for i in range(1536)]
LAYER5 = [[5, i] for i in range(1536)]
LAST = [[29, i] for i in range(1536)]


def _hostile_specs(max_factor: float, max_value: float) -> list[dict]:
    def iv(neurons, **op):
        return {"interventions": [{"neurons": neurons, **op}]}

    return [
        iv(LAYER5, op="scale", factor=max_factor),
        iv(ALL, op="scale", factor=max_factor),
        iv(ALL, op="scale", factor=-max_factor),
        iv(ALL, op="clamp", value=max_value),
        iv(ALL, op="clamp", value=-max_value),
        iv(LAST, op="clamp", value=max_value),
        {"interventions": [{"neurons": ALL, "op": "scale", "factor": max_factor, "positions": "prompt"},
                           {"neurons": LAST, "op": "clamp", "value": -max_value, "positions": "generated"}]},
    ]


SLOTS = 5  # 4 masks at once: also the admission-control test's engine


@pytest.fixture(scope="module")
def hostile_llm():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KN_STEER_SLOTS", str(SLOTS))
        llm = make_llm(default_ref()[0].path, **dict(ENGINE_KW, max_num_seqs=16), enforce_eager=True,
                       num_gpu_blocks_override=KV_BLOCKS)
    yield llm
    shutdown(llm)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


def _plain(llm) -> list[list[int]]:
    llm.reset_prefix_cache()  # recompute in reused blocks rather than read the clean run's cache
    return _tokens(llm.generate(PLAIN, [greedy(16)] * len(PLAIN), use_tqdm=False))


def _assert_finite(outs) -> None:
    for out in outs:
        for step in out.outputs[0].logprobs:
            assert all(math.isfinite(lp.logprob) for lp in step.values()), "a steered output is non-finite"


def test_beyond_the_limits_is_refused(hostile_llm):
    from kn_steer.errors import SpecError

    for spec, message in [
        ({"interventions": [{"neurons": LAYER5, "op": "scale", "factor": 1e39}]}, "beyond this server's limit"),
        ({"interventions": [{"neurons": LAST, "op": "clamp", "value": 1e19}]}, "beyond this server's limit"),
        ({"interventions": [{"neurons": LAYER5, "op": "scale", "factor": 50.0},
                            {"neurons": LAYER5, "op": "scale", "factor": 50.0}]}, "in all"),
    ]:
        with pytest.raises(SpecError, match=message):
            hostile_llm.generate([PLAIN[0]], [greedy(4, spec)], use_tqdm=False)


def test_hostile_doses_never_change_other_requests(hostile_llm):
    from kn_steer.steering.limits import RequestLimits

    limits = RequestLimits()  # the float32 defaults this engine serves with
    specs = _hostile_specs(limits.max_abs_factor, limits.max_abs_value)
    clean = _plain(hostile_llm)

    # one hostile request at a time, then the unsteered prompts
    for spec in specs:
        out = hostile_llm.generate([STORY * 3 + "Then"], [greedy(8, spec, logprobs=1)], use_tqdm=False)
        _assert_finite(out)
        assert _plain(hostile_llm) == clean, spec["interventions"][0]

    # 40 concurrent long hostile requests, then the unsteered prompts
    prompts = [STORY * (2 + i % 3) + f"Chapter {i}:" for i in range(40)]
    outs = hostile_llm.generate(prompts, [greedy(12, specs[i % len(specs)], logprobs=1) for i in range(40)],
                                use_tqdm=False)
    _assert_finite(outs)
    assert _plain(hostile_llm) == clean

    # a mixed batch: 12 hostile requests and the unsteered prompts side by side
    hostile_llm.reset_prefix_cache()
    mixed = prompts[:12] + PLAIN
    params = [greedy(16, specs[i % len(specs)]) for i in range(12)] + [greedy(16)] * len(PLAIN)
    together = _tokens(hostile_llm.generate(mixed, params, use_tqdm=False))
    assert together[12:] == clean
    assert _plain(hostile_llm) == clean


def test_more_distinct_masks_than_slots_wait_their_turn(hostile_llm):
    """12 specs x 2 distinct masks on a bank of 4 usable slots: each output equals its request alone."""
    (status,) = hostile_llm.collective_rpc("kn_steer_status")
    assert status["slots"]["capacity"] == SLOTS
    specs = [{"interventions": [
        {"neurons": [[layer, i] for layer in range(10, 20) for i in range(k, 1536, 13)], "op": "scale",
         "factor": 0.0, "positions": "prompt"},
        {"neurons": [[layer, 7 * k + 1] for layer in range(20, 30)], "op": "clamp", "value": 3.0,
         "positions": "generated"},
    ]} for k in range(12)]
    prompts = [f"{STORY}Question {k}: what happened next?" for k in range(16)]
    params = [greedy(10, specs[k]) if k < 12 else greedy(10) for k in range(16)]
    together = _tokens(hostile_llm.generate(prompts, params, use_tqdm=False))
    alone = [_tokens(hostile_llm.generate([p], [q], use_tqdm=False))[0] for p, q in zip(prompts, params)]
    assert together == alone
    plain = _tokens(hostile_llm.generate(prompts[:12], [greedy(10)] * 12, use_tqdm=False))
    assert sum(together[k] != plain[k] for k in range(12)) >= 6  # the specs really steer
    (after,) = hostile_llm.collective_rpc("kn_steer_status")
    assert after["slots"]["in_use"] <= SLOTS - 1 and after["counters"]["steered_requests"] >= 24
