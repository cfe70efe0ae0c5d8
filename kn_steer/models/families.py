"""The one table of model-family knowledge, as data: where each site lives and how big it is.

Every family hooks the same point for neurons: one unit of the *input of the MLP's output
projection*. For gated MLPs (Llama, Mistral, Qwen2/3, Gemma) that input is
``act(gate(x)) * up(x)``; for non-gated MLPs (GPT-2, OPT, GPT-NeoX) it is ``act(fc(x))``.
The same module paths name those modules in transformers and in vLLM, so the offline methods,
the transformers reference intervention and the vLLM plugin all read this table (through
:mod:`kn_steer.models.sites`) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kn_steer.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class FamilyAdapter:
    """Where one model family keeps its MLP neurons."""

    family: str
    architectures: tuple[str, ...]  # config.architectures names (transformers and vLLM)
    model_types: tuple[str, ...]  # config.model_type values
    gated: bool
    layers_path: str  # attribute path of the decoder-layer list, from the CausalLM object
    out_proj: str  # path inside a layer of the output projection; the neuron is its input
    in_proj: str  # path inside a layer of the projection whose rows *read* the residual stream
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    serving: bool = False  # the vLLM plugin is tested on this family
    # paths from the CausalLM object of the modules between the last decoder layer and the LM head,
    # applied in order (a missing/None module is skipped, e.g. OPT's project_out when unused)
    final_modules: tuple[str, ...] = ()
    # norms a neuron's directions pass through (paths inside a layer; None: none): the one before the
    # MLP scales what a neuron reads, one on the MLP's output (Gemma 2/3) scales what it writes
    mlp_in_norm: str | None = None
    mlp_out_norm: str | None = None
    norm_offset: float = 0.0  # an RMSNorm's gain is ``offset + weight`` (Gemma stores the gain minus one)
    # gated MLPs: the gate projection (transformers' path; vLLM fuses it with up). A neuron *fires* when
    # its gate is open (gate(x) > 0, where SiLU and GELU turn positive); non-gated: when act(fc(x)) > 0
    gate_proj: str | None = None
    # path inside a layer of the attention's output projection: its input is the heads' outputs
    # concatenated ([heads * head_dim], heads in order), the ``attn.heads`` site
    attn_out: str | None = None
    # vLLM's decoder layers of this family return ``(hidden, residual)``, the residual add deferred to
    # the next layer's fused add-norm: the residual stream (``resid.post``) is their sum. transformers'
    # layers return the stream itself (a tensor, or a tuple that starts with it)
    vllm_residual_pair: bool = False

    def num_layers(self, config: Any) -> int:
        return int(_first_attr(config, ("num_hidden_layers", "n_layer", "num_layers")))

    def intermediate_size(self, config: Any) -> int:
        value = _first_attr(config, ("intermediate_size", "ffn_dim", "n_inner"), default=None)
        if value is None:  # GPT-2 leaves n_inner unset: 4 * hidden
            value = 4 * int(_first_attr(config, ("hidden_size", "n_embd")))
        return int(value)

    def num_heads(self, config: Any) -> int:
        return int(_first_attr(config, ("num_attention_heads", "n_head")))

    def hidden_size(self, config: Any) -> int:
        return int(_first_attr(config, ("hidden_size", "n_embd", "d_model")))

    def head_dim(self, config: Any) -> int:
        value = getattr(config, "head_dim", None)  # Gemma 3: 256 per head, heads x head_dim != hidden
        if value is None:
            value = self.hidden_size(config) // self.num_heads(config)
        return int(value)


def _first_attr(obj: Any, names: tuple[str, ...], default: Any = ...) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    if default is ...:
        raise AttributeError(f"config has none of {names}")
    return default


_LLAMA_LIKE = dict(
    gated=True, layers_path="model.layers", out_proj="mlp.down_proj", in_proj="mlp.up_proj", gate_proj="mlp.gate_proj",
    final_modules=("model.norm",), mlp_in_norm="post_attention_layernorm", attn_out="self_attn.o_proj",
    vllm_residual_pair=True,
)
_GEMMA2_LIKE = {**_LLAMA_LIKE, "mlp_in_norm": "pre_feedforward_layernorm",
                "mlp_out_norm": "post_feedforward_layernorm", "norm_offset": 1.0}

ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("llama", ("LlamaForCausalLM",), ("llama",), serving=True, **_LLAMA_LIKE),
    FamilyAdapter("mistral", ("MistralForCausalLM",), ("mistral",), serving=True, **_LLAMA_LIKE),
    FamilyAdapter("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), serving=True, **_LLAMA_LIKE),
    FamilyAdapter("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), serving=True, **_LLAMA_LIKE),
    FamilyAdapter("gemma", ("GemmaForCausalLM",), ("gemma",), **{**_LLAMA_LIKE, "norm_offset": 1.0}),
    FamilyAdapter("gemma2", ("Gemma2ForCausalLM",), ("gemma2",), **_GEMMA2_LIKE),
    # served: proven against the transformers reference on Gemma-3-270M (tests/integration/test_serving_gemma.py)
    FamilyAdapter("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text",), serving=True, **_GEMMA2_LIKE),
    FamilyAdapter(
        "gpt2", ("GPT2LMHeadModel",), ("gpt2",), gated=False, layers_path="transformer.h",
        out_proj="mlp.c_proj", in_proj="mlp.c_fc", conv1d=True, final_modules=("transformer.ln_f",),
        mlp_in_norm="ln_2", attn_out="attn.c_proj",
    ),
    FamilyAdapter(
        "opt", ("OPTForCausalLM",), ("opt",), gated=False, layers_path="model.decoder.layers",
        out_proj="fc2", in_proj="fc1",
        final_modules=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        mlp_in_norm="final_layer_norm", attn_out="self_attn.out_proj",
    ),
    FamilyAdapter(
        "gpt_neox", ("GPTNeoXForCausalLM",), ("gpt_neox",), gated=False,
        layers_path="gpt_neox.layers", out_proj="mlp.dense_4h_to_h", in_proj="mlp.dense_h_to_4h",
        final_modules=("gpt_neox.final_layer_norm",), mlp_in_norm="post_attention_layernorm",
        attn_out="attention.dense",
    ),
)


def supported_architectures(serving_only: bool = False) -> list[str]:
    return [a for ad in ADAPTERS if ad.serving or not serving_only for a in ad.architectures]


def adapter_for_config(config: Any, serving: bool = False) -> FamilyAdapter:
    """The adapter for a transformers/vLLM config, or a clear error naming what is supported."""
    archs = tuple(getattr(config, "architectures", None) or ())
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if set(archs) & set(adapter.architectures) or (not archs and model_type in adapter.model_types):
            if serving and not adapter.serving:
                raise UnsupportedArchitecture(
                    f"kn-steer serving does not support {archs or model_type} yet; "
                    f"supported for serving: {', '.join(supported_architectures(True))}"
                )
            return adapter
    name = ", ".join(archs) or str(model_type)
    raise UnsupportedArchitecture(
        f"unsupported architecture {name!r}; kn-steer supports: "
        f"{', '.join(supported_architectures(serving))}"
    )


@dataclass(frozen=True)
class ModelShape:
    """What a neuron set must agree with: layer count and neurons per layer; the attention heads
    per layer with their width, and the residual stream's width (0 where unknown: head and
    direction interventions are then refused)."""

    num_layers: int
    intermediate_size: int
    num_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0

    @property
    def num_neurons(self) -> int:
        return self.num_layers * self.intermediate_size

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        adapter = adapter_for_config(config)
        return cls(adapter.num_layers(config), adapter.intermediate_size(config), adapter.num_heads(config),
                   adapter.head_dim(config), adapter.hidden_size(config))
