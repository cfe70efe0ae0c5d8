"""Fast tests of the serving pieces that need no engine: mask bank, TP slicing, wire, salts, CLI."""

from __future__ import annotations

import numpy as np
import torch

from kn_steer.models.families import ModelShape
from kn_steer.serving.mask_bank import MaskBank, local_slice
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering, dense_mask

SHAPE = ModelShape(num_layers=3, intermediate_size=8)


def _compiled(spec):
    return compile_spec(spec, {}, SHAPE)


def _apply_reference(compiled: CompiledSteering, layer: int, x: torch.Tensor, is_prompt: torch.Tensor):
    out = []
    for kind in ("prompt", "generated"):
        mul, add = dense_mask(compiled.mask(kind), SHAPE)
        out.append(x * mul[layer] + add[layer])
    return torch.where(is_prompt[:, None], out[0], out[1])


def test_mask_bank_mixed_batch_matches_dense_reference():
    a = _compiled({"interventions": [{"neurons": [[0, 1], [1, 7], [2, 3]], "op": "scale", "factor": 2.5}]})
    b = _compiled({"interventions": [{"neurons": [[0, 1], [2, 0]], "op": "clamp", "value": -1.0,
                                      "positions": "generated"}]})
    bank = MaskBank(3, 8, 0, num_slots=5, max_tokens=64)
    bank.add_request("a", a)
    bank.add_request("plain", None)
    bank.add_request("b", b)
    bank.add_request("a2", a)  # same spec: shares slots
    req_ids = ["plain", "a", "b", "a2"]
    num_sched = np.array([3, 4, 2, 1])
    num_computed = np.array([0, 2, 5, 9])
    num_prompt = np.array([3, 4, 6, 5])
    bank.update_step(req_ids, num_sched, num_computed, num_prompt)
    x = torch.randn(10, 8)
    per_token = [(None, True)] * 3
    per_token += [(a, p < 4) for p in range(2, 6)]
    per_token += [(b, p < 6) for p in range(5, 7)]
    per_token += [(a, False)]
    for layer in range(3):
        got = bank.apply(layer, x)
        for t, (comp, is_prompt) in enumerate(per_token):
            want = x[t] if comp is None else _apply_reference(comp, layer, x[t : t + 1], torch.tensor([is_prompt]))[0]
            torch.testing.assert_close(got[t], want)
    # "a" uses one slot per kind (prompt == generated mask -> one key), "b" one (generated only)
    assert len({k for k in bank._slot_owner if k}) == 2
    # all requests gone -> every slot is the identity again and padding reads slot 0
    for r in req_ids:
        bank.remove_request(r)
    bank.update_step([], np.zeros(0, int), np.zeros(0, int), np.zeros(0, int))
    assert torch.equal(bank.mul, torch.ones_like(bank.mul)) and torch.equal(bank.add, torch.zeros_like(bank.add))
    assert int(bank.token_slots.abs().sum()) == 0


def test_mask_bank_evicts_unscheduled_masks_when_full():
    bank = MaskBank(3, 8, 0, num_slots=3, max_tokens=16)
    specs = [_compiled({"interventions": [{"neurons": [[0, i]], "op": "scale", "factor": 3.0}]}) for i in range(4)]
    for i, c in enumerate(specs):
        bank.add_request(f"r{i}", c)
    x = torch.ones(2, 8)
    for step in [(0, 1), (2, 3), (1, 2), (0, 3)]:
        ids = [f"r{i}" for i in step]
        bank.update_step(ids, np.array([1, 1]), np.array([5, 5]), np.array([1, 1]))
        out = bank.apply(0, x)
        for row, i in enumerate(step):
            want = torch.ones(8)
            want[i] = 3.0
            torch.testing.assert_close(out[row], want)


def test_tensor_parallel_slices_cover_the_full_layer():
    """Two ranks, each with its own half, give the same result as one full bank."""
    compiled = _compiled({"interventions": [{"neurons": [[0, 0], [0, 3], [0, 4], [1, 7], [2, 5]],
                                             "op": "clamp", "value": 4.0}]})
    x = torch.randn(3, 8)
    full = MaskBank(3, 8, 0, 3, 8)
    halves = [MaskBank(3, 4, 0, 3, 8), MaskBank(3, 4, 4, 3, 8)]
    for bank in [full, *halves]:
        bank.add_request("r", compiled)
        bank.update_step(["r"], np.array([3]), np.array([0]), np.array([2]))
    for layer in range(3):
        joined = torch.cat([halves[0].apply(layer, x[:, :4]), halves[1].apply(layer, x[:, 4:])], dim=1)
        torch.testing.assert_close(joined, full.apply(layer, x))


def test_local_slice_reads_row_parallel_attributes():
    class FakeRowParallel(torch.nn.Module):
        input_size_per_partition, tp_rank, tp_size = 48, 1, 2

    assert local_slice(FakeRowParallel(), 96) == (48, 48)
    assert local_slice(torch.nn.Linear(96, 4), 96) == (0, 96)


def test_mask_bank_is_traceable_by_torch_compile():
    """The per-layer math compiles once and follows in-place slot updates without recompiling."""
    bank = MaskBank(1, 8, 0, 3, 16)
    fn = torch.compile(lambda x: bank.apply(0, x), dynamic=True, fullgraph=True)
    x = torch.ones(4, 8)
    torch.testing.assert_close(fn(x), x)
    bank.add_request("r", _compiled({"interventions": [{"neurons": [[0, 2]], "op": "clamp", "value": 7.0}]}))
    bank.update_step(["r"], np.array([4]), np.array([0]), np.array([4]))
    assert float(fn(x)[0, 2]) == 7.0


def test_salt_and_error_type():
    from vllm.exceptions import VLLMValidationError

    from kn_steer.errors import SpecError
    from kn_steer.serving.frontend import SteeringRequestError
    from kn_steer.serving.wire import cache_salt

    c = _compiled({"interventions": [{"neurons": [[0, 2]], "op": "clamp", "value": 7.0}]})
    s1, s2 = cache_salt(c), cache_salt(c, "user-salt")
    for s in (s1, s2):
        assert len(s) <= 128 and "/" not in s
    assert s1 != s2
    err = SteeringRequestError("bad")
    assert isinstance(err, VLLMValidationError) and isinstance(err, SpecError) and err.parameter == "kn_steer"


def test_serve_command_builds_vllm_invocation(tmp_path):
    from kn_steer.cli.serve import build_command

    argv, env = build_command("smollm2-135m", tmp_path, "127.0.0.1", 8123, 500, None, ["--max-num-seqs", "8"])
    assert argv[1:4] == ["-m", "kn_steer.serving.launch", "serve"] and "--served-model-name" in argv and "smollm2-135m" in argv
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert env["KN_STEER_NEURON_SETS"] == str(tmp_path.resolve()) and env["KN_STEER_MAX_NEURONS"] == "500"
    assert argv[-2:] == ["--max-num-seqs", "8"]
