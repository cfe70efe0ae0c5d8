"""The transformers reference intervention and the spec rules it applies.

Real forwards of the default model (and tiny random models): identity is exact, scale and clamp
set the neuron to ``h * f`` / ``v``, and ``prompt`` / ``generated`` positions steer exactly the
forward passes the spec says, in a single forward and in ``generate`` alike.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from helpers.tiny import TINY_CONFIGS, build_tiny_model
from kn_steer.errors import SpecError
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import neuron_modules
from kn_steer.serving import wire
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.steering.compile import compile_spec
from kn_steer.steering.limits import RequestLimits
from kn_steer.steering.masks import CompiledSteering, SparseMask, dense_mask
from kn_steer.steering.reference import steer

SHAPE = ModelShape(30, 1536)
PROMPT = "The capital of France is"
# Enough neurons in the middle layers that a clamp visibly moves the output.
TARGETS = [[layer, index] for layer in (8, 12, 16) for index in range(0, 400, 4)]


def spec(op: str, positions: str = "all", **kw) -> dict:
    iv = {"neurons": TARGETS, "op": op, "positions": positions}
    iv.update(kw)
    return {"interventions": [iv]}


@contextmanager
def capture_after_steer(model, layer: int):
    """Record the neuron vector of ``layer`` as the output projection sees it, once per forward.

    Registered inside a ``steer`` block, this pre-hook runs after the steering hook.
    """
    seen: list[torch.Tensor] = []
    handle = neuron_modules(model)[layer].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def prompt_ids(default_hf):
    _, tokenizer = default_hf
    return tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def logits_of(model, ids, compiled=None, prompt_length=None):
    with torch.no_grad():
        if compiled is None:
            return model(input_ids=ids).logits
        with steer(model, compiled, prompt_length or ids.shape[1]):
            return model(input_ids=ids).logits


def greedy(model, ids, compiled=None, new=4):
    kwargs = dict(max_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        if compiled is None:
            out = model.generate(input_ids=ids, **kwargs)
        else:
            with steer(model, compiled, ids.shape[1]):
                out = model.generate(input_ids=ids, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, new, vocab]


# --- the reference on the default model ---------------------------------------------------------


def test_scale_one_is_identity(default_hf, prompt_ids) -> None:
    model, _ = default_hf
    base = logits_of(model, prompt_ids)
    compiled = compile_spec(spec("scale", factor=1.0), {}, SHAPE)
    assert compiled.is_identity
    assert torch.equal(logits_of(model, prompt_ids, compiled), base)
    # The hook path itself is exact too: explicit (mul 1, add 0) entries change nothing.
    n = len(TARGETS)
    ones = SparseMask(np.array([l for l, _ in TARGETS], np.int32), np.array([i for _, i in TARGETS], np.int32),
                      np.ones(n, np.float32), np.zeros(n, np.float32))
    assert torch.equal(logits_of(model, prompt_ids, CompiledSteering(ones, ones)), base)
    # And no hook is left behind.
    assert all(not m._forward_pre_hooks for m in neuron_modules(model))


def test_scale_and_clamp_set_the_neurons(default_hf, prompt_ids) -> None:
    model, _ = default_hf
    base = logits_of(model, prompt_ids)
    idx = [i for l, i in TARGETS if l == 12]
    others = sorted(set(range(1536)) - set(idx))
    for op, kw in (("scale", {"factor": 3.0}), ("scale", {"factor": 0.0}), ("clamp", {"value": 2.5})):
        compiled = compile_spec(spec(op, **kw), {}, SHAPE)
        # ``before`` is registered ahead of the steering hook, ``after`` behind it.
        with capture_after_steer(model, 12) as before:
            with steer(model, compiled, prompt_ids.shape[1]), capture_after_steer(model, 12) as after:
                with torch.no_grad():
                    steered = model(input_ids=prompt_ids).logits
        h, out = before[0], after[0]
        expect = h[..., idx] * kw["factor"] if op == "scale" else torch.full_like(h[..., idx], kw["value"])
        torch.testing.assert_close(out[..., idx], expect, rtol=0, atol=0)
        assert torch.equal(out[..., others], h[..., others])
        assert not torch.allclose(steered, base, atol=1e-3), (op, kw)


def test_generated_only_leaves_first_token(default_hf, prompt_ids) -> None:
    model, _ = default_hf
    base_seq, base = greedy(model, prompt_ids)
    compiled = compile_spec(spec("clamp", "generated", value=6.0), {}, SHAPE)
    seq, logits = greedy(model, prompt_ids, compiled)
    assert torch.equal(logits[:, 0], base[:, 0])  # predicted from the (unsteered) prompt pass
    assert not torch.allclose(logits[:, 1:], base[:, 1:], atol=1e-3)


def test_prompt_only_steers_only_the_prompt_pass(default_hf, prompt_ids) -> None:
    model, _ = default_hf
    _, base = greedy(model, prompt_ids)
    compiled = compile_spec(spec("clamp", "prompt", value=6.0), {}, SHAPE)
    _, logits = greedy(model, prompt_ids, compiled)
    assert not torch.allclose(logits[:, 0], base[:, 0], atol=1e-3)


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_generate_agrees_with_one_forward(default_hf, prompt_ids, positions: str) -> None:
    """Incremental decoding and one forward over prompt + continuation steer the same positions."""
    model, _ = default_hf
    compiled = compile_spec(spec("scale", positions, factor=-2.0), {}, SHAPE)
    seq, step_logits = greedy(model, prompt_ids, compiled)
    p = prompt_ids.shape[1]
    full = logits_of(model, seq, compiled, prompt_length=p)
    torch.testing.assert_close(full[:, p - 1 : -1], step_logits, rtol=1e-4, atol=1e-4)
    if positions == "generated":  # prompt positions are untouched in the single forward too
        torch.testing.assert_close(full[:, :p], logits_of(model, seq)[:, :p], rtol=0, atol=0)


def test_left_padded_batch(default_hf) -> None:
    model, tokenizer = default_hf
    prompts = [PROMPT, "Water is made of hydrogen and"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    compiled = compile_spec(spec("clamp", "generated", value=6.0), {}, SHAPE)
    kwargs = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        base = model.generate(**batch, **kwargs)
        with steer(model, compiled, batch["input_ids"].shape[1]):
            steered = model.generate(**batch, **kwargs)
    assert torch.equal(steered.logits[0], base.logits[0])
    assert not torch.allclose(steered.logits[1], base.logits[1], atol=1e-3)
    # Each row of the batch is steered as it would be alone.
    alone = tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    _, alone_logits = greedy(model, alone, compiled, new=3)
    torch.testing.assert_close(steered.logits[1][1], alone_logits[0, 1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_batched(family: str) -> None:
    """The hook works for every family's neuron layout (OPT flattens batch and tokens)."""
    model = build_tiny_model(family)
    shape = ModelShape.from_config(model.config)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    compiled = compile_spec({"interventions": [
        {"neurons": [[1, 5], [1, 9]], "op": "clamp", "value": 4.0, "positions": "prompt"},
        {"neurons": [[1, 5]], "op": "clamp", "value": -4.0, "positions": "generated"},
    ]}, {}, shape)
    with steer(model, compiled, prompt_length=4), capture_after_steer(model, 1) as seen:
        with torch.no_grad():
            batched = model(input_ids=ids).logits
    h = seen[0].reshape(3, 6, shape.intermediate_size)
    assert torch.all(h[:, :4, 5] == 4.0) and torch.all(h[:, :4, 9] == 4.0)
    assert torch.all(h[:, 4:, 5] == -4.0) and not torch.any(h[:, 4:, 9] == 4.0)
    with steer(model, compiled, prompt_length=4), torch.no_grad():
        single = model(input_ids=ids[2:3]).logits
    torch.testing.assert_close(batched[2:3], single, rtol=1e-4, atol=1e-5)


# --- composition rules (kn_steer/spec.py) -------------------------------------------------------


def _dense(compiled: CompiledSteering, kind: str):
    return dense_mask(compiled.mask(kind), SHAPE)


def _iv(op: str, neurons=((1, 2),), positions="all", **kw) -> dict:
    return {"neurons": [list(n) for n in neurons], "op": op, "positions": positions, **kw}


def test_scales_multiply() -> None:
    c = compile_spec({"interventions": [_iv("scale", factor=2.0), _iv("scale", factor=3.0)]}, {}, SHAPE)
    mul, add = _dense(c, "prompt")
    assert mul[1, 2] == 6.0 and add[1, 2] == 0.0
    assert mul.sum() == SHAPE.num_layers * SHAPE.intermediate_size - 1 + 6.0
    assert c.prompt.key() == c.generated.key()


@pytest.mark.parametrize("order", ["clamp-first", "clamp-last"])
def test_clamp_wins_regardless_of_order(order: str) -> None:
    ivs = [_iv("clamp", value=1.5), _iv("scale", factor=4.0)]
    if order == "clamp-last":
        ivs.reverse()
    c = compile_spec({"interventions": ivs}, {}, SHAPE)
    for kind in ("prompt", "generated"):
        mul, add = _dense(c, kind)
        assert (mul[1, 2].item(), add[1, 2].item()) == (0.0, 1.5)


def test_last_clamp_wins_and_positions_are_separate() -> None:
    c = compile_spec({"interventions": [
        _iv("clamp", value=1.0), _iv("clamp", value=-2.0),
        _iv("scale", neurons=[(3, 4)], positions="prompt", factor=2.0),
        _iv("scale", neurons=[(3, 4)], factor=5.0),
    ]}, {}, SHAPE)
    mul_p, add_p = _dense(c, "prompt")
    mul_g, add_g = _dense(c, "generated")
    assert (mul_p[1, 2].item(), add_p[1, 2].item()) == (0.0, -2.0)
    assert (mul_g[1, 2].item(), add_g[1, 2].item()) == (0.0, -2.0)
    assert mul_p[3, 4] == 10.0 and mul_g[3, 4] == 5.0
    assert wire.cache_salt(c) != wire.cache_salt(compile_spec({"interventions": []}, {}, SHAPE))
    assert wire.cache_salt(wire.decode(wire.encode(c))) == wire.cache_salt(c)


def test_sets_defaults_overrides_and_layer_filter() -> None:
    identity = ModelIdentity(name="m", fingerprint="sha256:x", architecture="LlamaForCausalLM",
                             num_layers=30, intermediate_size=1536)
    ns = NeuronSet(name="s", model=identity, method=MethodInfo(name="kn"),
                   operation=Operation(op="scale", factor=0.0),
                   neurons=[Neuron(layer=1, index=1), Neuron(layer=2, index=2, factor=3.0),
                            Neuron(layer=5, index=5, value=9.0)])
    c = compile_spec({"interventions": [{"set": "s"}]}, {"s": ns}, SHAPE)
    mul, add = _dense(c, "prompt")
    assert (mul[1, 1], mul[2, 2], mul[5, 5]) == (0.0, 3.0, 0.0)  # set default, per-neuron factor
    c = compile_spec({"interventions": [{"set": "s", "op": "scale", "factor": 0.5, "layers": [2]}]},
                     {"s": ns}, SHAPE)
    mul, _ = _dense(c, "generated")
    assert mul[2, 2] == 0.5 and mul[1, 1] == 1.0 and c.prompt.size == 1
    c = compile_spec({"interventions": [{"set": "s", "op": "clamp", "value": 0.25}]}, {"s": ns}, SHAPE)
    mul, add = _dense(c, "prompt")
    assert (add[1, 1], add[5, 5]) == (0.25, 0.25)  # the request's value overrides per-neuron ones
    c = compile_spec({"interventions": [{"set": "s", "op": "clamp", "layers": [5]}]}, {"s": ns}, SHAPE)
    assert _dense(c, "prompt")[1][5, 5] == 9.0
    with pytest.raises(SpecError, match=r"interventions\[0\]\.value"):  # no value for neuron (1, 1)
        compile_spec({"interventions": [{"set": "s", "op": "clamp", "layers": [1]}]}, {"s": ns}, SHAPE)


# --- compile errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"interventions": [{"set": "nope"}]}, "kn_steer.interventions[0].set"),
        ({"interventions": [_iv("scale", factor=1.0), _iv("scale", [(0, 1536)], factor=2.0)]},
         "kn_steer.interventions[1].neurons[0]"),
        ({"interventions": [_iv("scale", [(0, 1), (30, 0)], factor=2.0)]}, "kn_steer.interventions[0].neurons[1]"),
        ({"interventions": [_iv("scale", [(-1, 0)], factor=2.0)]}, "kn_steer.interventions[0].neurons[0]"),
        ({"interventions": [_iv("scale", factor=2.0, layers=[31])]}, "kn_steer.interventions[0].layers"),
        ({"interventions": [{"neurons": [[0, 1]]}]}, "kn_steer.interventions[0]"),
        ({"interventions": [_iv("scale", value=1.0)]}, "kn_steer.interventions[0]"),
        ({"interventions": [_iv("scale", factor=float("nan"))]}, "kn_steer.interventions[0]"),
        ({"interventions": [{"set": "a", "neurons": [[0, 1]], "op": "scale", "factor": 1}]},
         "kn_steer.interventions[0]"),
        ({"interventions": [_iv("scale", factor=2.0, positions="later")]}, "kn_steer.interventions[0].positions"),
        ({"interventions": [_iv("scale", factor=2.0, colour="red")]}, "kn_steer.interventions[0].colour"),
        ({"interventions": [_iv("scale", neurons=[(0, "x")], factor=2.0)]}, "kn_steer.interventions[0].neurons[0][1]"),
        ({"interventions": "all"}, "kn_steer.interventions"),
        ('{"interventions": [', "kn_steer: not valid JSON"),
        ([1, 2], "kn_steer: expected an object"),
        ({"experiment": "ab1"}, "kn_steer.experiment"),
    ],
)
def test_compile_errors_name_the_field(raw, field: str) -> None:
    with pytest.raises(SpecError) as err:
        compile_spec(raw, {}, SHAPE)
    assert field in str(err.value)


def test_too_many_neurons() -> None:
    raw = {"interventions": [_iv("scale", [(0, i) for i in range(10)], factor=2.0),
                             _iv("clamp", [(1, i) for i in range(10)], value=0.0)]}
    assert compile_spec(raw, {}, SHAPE, RequestLimits(max_neurons=20)).prompt.size == 20
    with pytest.raises(SpecError, match="20 distinct neurons requested, more than this server.s limit of 19"):
        compile_spec(raw, {}, SHAPE, RequestLimits(max_neurons=19))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_head_masks_act_on_each_heads_slice_of_the_attention_output(family):
    """Scaling head h of layer 1 by f multiplies exactly its ``head_dim`` values of the attention
    output projection's input (the other heads and layers untouched), on every family."""
    from kn_steer.models.sites import ATTN_HEADS, hook_site, remove_hooks

    model = build_tiny_model(family)
    shape = ModelShape.from_config(model.config)
    head = shape.num_heads - 1
    compiled = compile_spec({"interventions": [{"heads": [[1, head]], "op": "scale", "factor": 3.0},
                                               {"heads": [[2, 0]], "op": "clamp", "value": 0.25}]}, {}, shape)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def record(store):
        def fn(layer, rows):
            store.setdefault(layer, []).append(rows.detach().clone())
        return fn

    plain, steered = {}, {}
    handles = hook_site(model, record(plain), site=ATTN_HEADS)
    with torch.no_grad():
        model(ids)
    remove_hooks(handles)
    with steer(model, compiled, prompt_length=5):
        handles = hook_site(model, record(steered), site=ATTN_HEADS)  # registered after: sees the steered input
        with torch.no_grad():
            model(ids)
        remove_hooks(handles)
    d = shape.head_dim
    torch.testing.assert_close(steered[0][0], plain[0][0])
    got, base = steered[1][0], plain[1][0]
    torch.testing.assert_close(got[:, head * d:(head + 1) * d], 3.0 * base[:, head * d:(head + 1) * d])
    torch.testing.assert_close(got[:, : head * d], base[:, : head * d])
    assert torch.all(steered[2][0][:, :d] == 0.25)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_direction_add_and_ablate_act_on_the_stream_after_each_layer(family):
    """``add`` shifts the stream after layer 1 by exactly alpha * v; ``ablate`` leaves no component
    along u after layer 2; other layers' streams only change through what flows from those."""
    from kn_steer.models.sites import hook_residual, remove_hooks

    model = build_tiny_model(family)
    shape = ModelShape.from_config(model.config)
    gen = torch.Generator().manual_seed(1)
    v, u = torch.randn(shape.hidden_size, generator=gen), torch.randn(shape.hidden_size, generator=gen)
    compiled = compile_spec({"interventions": [
        {"direction": v.tolist(), "op": "add", "alpha": 0.5, "layers": [1]},
        {"direction": u.tolist(), "op": "ablate", "layers": [2]}]}, {}, shape)
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))

    def record(store):
        def fn(layer, rows):
            store[layer] = rows.detach().clone()
        return fn

    plain, steered, inputs = {}, {}, {}
    handles = hook_residual(model, record(plain))
    with torch.no_grad():
        model(ids)
    remove_hooks(handles)
    with steer(model, compiled, prompt_length=5):
        handles = hook_residual(model, record(steered))  # registered after: sees the steered stream
        with torch.no_grad():
            model(ids)
        remove_hooks(handles)
    torch.testing.assert_close(steered[0], plain[0])
    torch.testing.assert_close(steered[1], plain[1] + 0.5 * v.to(plain[1].dtype), rtol=1e-5, atol=1e-5)
    along = steered[2].float() @ (u / u.norm())
    assert along.abs().max() < 1e-4 * steered[2].abs().max()
