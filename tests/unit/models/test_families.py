"""The adapter table finds the neuron (input of the MLP output projection) in every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.activations import ACT2FN

from helpers.tiny import TINY_CONFIGS, build_tiny_model
from kn_steer.errors import UnsupportedArchitecture
from kn_steer.models.families import (
    ModelShape,
    adapter_for_config,
    supported_architectures,
)
from kn_steer.models.sites import (
    decoder_layers,
    get_path,
    neuron_module_names,
    neuron_modules,
    read_vectors,
    write_vectors,
)

FAMILIES = sorted(TINY_CONFIGS)
EXPECTED_INTERMEDIATE = {f: 96 for f in FAMILIES} | {"gpt2": 4 * 64}


def _capture(model, input_ids):
    """Per layer: the neuron module's input and output, and the read (in_proj) module's output."""
    adapter = adapter_for_config(model.config)
    seen: dict[str, dict[int, torch.Tensor]] = {"h": {}, "out": {}, "pre": {}}
    handles = []
    for layer, (block, module) in enumerate(zip(decoder_layers(model), neuron_modules(model))):
        def pre(_m, args, layer=layer):
            seen["h"][layer] = args[0].detach().clone()

        def post(_m, _args, out, layer=layer):
            seen["out"][layer] = out.detach().clone()

        def read(_m, _args, out, layer=layer):
            seen["pre"][layer] = out.detach().clone()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post),
                    get_path(block, adapter.in_proj).register_forward_hook(read)]
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_neurons(family: str) -> None:
    model = build_tiny_model(family)
    adapter = adapter_for_config(model.config)
    assert adapter.family == family
    shape = ModelShape.from_config(model.config)
    assert (shape.num_layers, shape.intermediate_size) == (3, EXPECTED_INTERMEDIATE[family])
    heads_out = get_path(decoder_layers(model)[0], adapter.attn_out)  # its input: every head's output
    width = heads_out.weight.shape[0] if adapter.conv1d else heads_out.weight.shape[1]
    assert shape.num_heads >= 1 and shape.num_heads * shape.head_dim == width
    assert len(decoder_layers(model)) == 3
    names = neuron_module_names(model.config)
    modules = dict(model.named_modules())
    assert [modules[n] for n in names] == neuron_modules(model)
    hidden = model.config.hidden_size if family != "gpt2" else model.config.n_embd

    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    seen = _capture(model, ids)
    for layer in range(3):
        h, out, pre = seen["h"][layer], seen["out"][layer], seen["pre"][layer]
        # OPT flattens (batch, tokens) before its MLP; every other family keeps them apart.
        assert h.shape[-1] == shape.intermediate_size and h.numel() == 2 * 7 * shape.intermediate_size
        # The write vectors are the rows the output projection adds up: out = h @ W (+ bias).
        w = write_vectors(model, layer)
        assert w.shape == (shape.intermediate_size, hidden)
        bias = getattr(neuron_modules(model)[layer], "bias", None)
        expected = h @ w + (bias if bias is not None else 0)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        r = read_vectors(model, layer)
        assert r.shape == (shape.intermediate_size, hidden)
        assert pre.shape[-1] == shape.intermediate_size
        if not adapter.gated:
            # Non-gated MLPs: the neuron is exactly act(fc(x)).
            act_name = getattr(model.config, "activation_function", None) or model.config.hidden_act
            torch.testing.assert_close(h, ACT2FN[act_name](pre), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_read_vectors_are_input_rows(family: str) -> None:
    """read_vectors(l) @ x is the in_proj output (orientation right, Conv1D included)."""
    model = build_tiny_model(family)
    adapter = adapter_for_config(model.config)
    block = decoder_layers(model)[1]
    in_proj = get_path(block, adapter.in_proj)
    seen = {}
    handle = in_proj.register_forward_hook(lambda _m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        model(input_ids=torch.arange(5)[None])
    handle.remove()
    bias = getattr(in_proj, "bias", None)
    expected = seen["x"] @ read_vectors(model, 1).T + (bias if bias is not None else 0)
    torch.testing.assert_close(seen["y"], expected, rtol=1e-4, atol=1e-5)


def test_default_model_shape(default_hf) -> None:
    model, _ = default_hf
    adapter = adapter_for_config(model.config)
    assert adapter.family == "llama" and adapter.gated and adapter.serving
    assert ModelShape.from_config(model.config) == ModelShape(30, 1536, 9, 64, 576)  # SmolLM2-135M: 9 heads of 64, stream 576
    assert neuron_module_names(model.config)[7] == "model.layers.7.mlp.down_proj"
    assert len(neuron_modules(model)) == 30
    assert read_vectors(model, 0).shape == (1536, 576)
    assert write_vectors(model, 29).shape == (1536, 576)


@pytest.mark.parametrize(
    "model_type,kwargs,arch",
    [
        ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
         "BertForMaskedLM"),
        ("t5", dict(d_model=32, num_layers=2, num_heads=2, d_ff=64), "T5ForConditionalGeneration"),
    ],
)
def test_unsupported_architecture(model_type: str, kwargs: dict, arch: str) -> None:
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [arch]
    with pytest.raises(UnsupportedArchitecture) as err:
        adapter_for_config(config)
    message = str(err.value)
    assert arch in message
    for supported in ("LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message
    with pytest.raises(UnsupportedArchitecture):
        ModelShape.from_config(config)


def test_serving_support_is_named() -> None:
    config = build_tiny_model("gpt2").config
    assert adapter_for_config(config).family == "gpt2"
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        adapter_for_config(config, serving=True)
    assert "GPT2LMHeadModel" not in supported_architectures(serving_only=True)
    assert "GPT2LMHeadModel" in supported_architectures()


def test_gemma3_neurons_on_the_real_model() -> None:
    """Gemma 3 (model_type gemma3_text): 18 x 2048 neurons at the input of mlp.down_proj, which
    is gelu_tanh(gate_proj(x)) * up_proj(x), the same module path vLLM's Gemma 3 uses."""
    from kn_steer.models import load_hf_model, resolve_model

    model, tokenizer = load_hf_model(resolve_model("gemma3-270m"))
    adapter = adapter_for_config(model.config)
    assert adapter.family == "gemma3" and adapter.gated and adapter.serving
    assert model.config.model_type == "gemma3_text"
    assert ModelShape.from_config(model.config) == ModelShape(18, 2048, 4, 256, 640)  # Gemma-3-270M (stream 640): 4 heads of 256 (not hidden / heads)
    assert neuron_module_names(model.config)[17] == "model.layers.17.mlp.down_proj"
    assert model.config.hidden_activation == "gelu_pytorch_tanh"
    gate = get_path(decoder_layers(model)[5], "mlp.gate_proj")
    seen_gate = {}
    handle = gate.register_forward_hook(lambda _m, _a, out: seen_gate.update(g=out))
    try:
        seen = _capture(model, tokenizer("The capital of France is", return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    expected = ACT2FN["gelu_pytorch_tanh"](seen_gate["g"]) * seen["pre"][5]  # pre: up_proj output
    torch.testing.assert_close(seen["h"][5], expected, rtol=1e-5, atol=1e-5)


def test_gemma3_gguf_config_without_architectures() -> None:
    """The GGUF's config names no architecture, only model_type gemma3_text: still Gemma."""
    config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=2, head_dim=16)
    assert not getattr(config, "architectures", None)
    assert adapter_for_config(config).family == "gemma3"
    assert ModelShape.from_config(config) == ModelShape(2, 96, 2, 16, 64)
