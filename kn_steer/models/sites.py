"""Sites: the tensors kn-steer reads and writes inside a forward pass, one canonical view for all.

A *site* is named like a TransformerLens hook point:

* ``mlp.neurons`` — per layer, the input of the MLP's output projection (``blocks.{l}.mlp.hook_post``
  in TransformerLens terms); ``intermediate_size`` units.
* ``attn.heads`` — per layer, the input of the attention's output projection: every head's output
  concatenated (``blocks.{l}.attn.hook_z``, flattened); ``num_heads`` units of ``head_dim`` values.
* ``resid.post`` — per layer, the residual stream after the decoder layer (``blocks.{l}.hook_resid_post``);
  ``hidden_size`` values. transformers' layers return it; vLLM's llama-like layers return it as two
  tensors whose sum it is (family table: ``vllm_residual_pair``). :func:`hook_residual` hides that.

Where a site lives comes from the family table (:mod:`kn_steer.models.families`); how its tensor is
laid out is solved here once. Families hand the module different shapes (``[B, T, I]``,
``[1, B*T, I]`` when rows are packed, OPT's flattened ``[B*T, I]``, vLLM's ``[tokens, I]``); every
caller sees the same **canonical view**: a 2-D ``[rows, units]`` tensor whose rows are the tokens in
the order the module received them (batch-major, then position). A hook that returns a tensor of
that shape has it reshaped back. The transformers reference intervention, the attribution engine,
the activation recorder and the vLLM plugin all hook through :func:`hook_site`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from kn_steer.models.families import FamilyAdapter, adapter_for_config

MLP_NEURONS = "mlp.neurons"
ATTN_HEADS = "attn.heads"
RESID_POST = "resid.post"
SITES: tuple[str, ...] = (MLP_NEURONS, ATTN_HEADS, RESID_POST)
SiteName = Literal["mlp.neurons", "attn.heads", "resid.post"]

#: ``fn(layer, rows)``: ``rows`` is the canonical ``[rows, units]`` view; return a replacement of
#: the same shape, or None to leave the tensor as it is.
SiteFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _family(model: nn.Module, family: FamilyAdapter | None) -> FamilyAdapter:
    return family or adapter_for_config(model.config)


def _site_path(family: FamilyAdapter, site: str) -> str:
    if site == MLP_NEURONS:
        return family.out_proj
    if site == ATTN_HEADS:
        if family.attn_out is None:
            raise ValueError(f"family {family.family!r} names no attention output projection")
        return family.attn_out
    raise ValueError(f"unknown site {site!r}; known: {', '.join(SITES)}")


def decoder_layers(model: nn.Module, family: FamilyAdapter | None = None) -> list[nn.Module]:
    family = _family(model, family)
    return list(get_path(model, family.layers_path))


def site_modules(model: nn.Module, site: str = MLP_NEURONS, family: FamilyAdapter | None = None,
                 missing_ok: bool = False) -> dict[int, nn.Module]:
    """Layer -> the module whose input is the site. ``missing_ok``: skip layers without it
    (pipeline-parallel placeholders in vLLM) instead of raising."""
    family = _family(model, family)
    path = _site_path(family, site)
    found: dict[int, nn.Module] = {}
    for i, layer in enumerate(get_path(model, family.layers_path)):
        try:
            found[i] = get_path(layer, path)
        except (AttributeError, IndexError):
            if not missing_ok:
                raise
    return found


def neuron_modules(model: nn.Module, family: FamilyAdapter | None = None) -> list[nn.Module]:
    """Per layer, the module whose *input* is the neuron vector."""
    return list(site_modules(model, MLP_NEURONS, family).values())


def neuron_module_names(config: Any, num_layers: int | None = None) -> list[str]:
    """Fully qualified module names of the output projections (same in transformers and vLLM)."""
    family = adapter_for_config(config)
    n = num_layers if num_layers is not None else family.num_layers(config)
    return [f"{family.layers_path}.{i}.{family.out_proj}" for i in range(n)]


def final_modules(model: nn.Module, family: FamilyAdapter | None = None) -> list[nn.Module]:
    """The modules applied after the last decoder layer and before the LM head, in order."""
    family = _family(model, family)
    found = []
    for path in family.final_modules:
        try:
            module = get_path(model, path)
        except AttributeError:
            module = None
        if module is not None:
            found.append(module)
    return found


def read_vectors(model: nn.Module, layer: int, family: FamilyAdapter | None = None) -> torch.Tensor:
    """[intermediate, hidden]: the residual-stream direction each neuron reads (its up/fc row)."""
    family = _family(model, family)
    weight = get_path(decoder_layers(model, family)[layer], family.in_proj).weight
    return weight.detach() if family.conv1d is False else weight.detach().T


def write_vectors(model: nn.Module, layer: int, family: FamilyAdapter | None = None) -> torch.Tensor:
    """[intermediate, hidden]: the residual-stream direction each neuron writes (down column)."""
    family = _family(model, family)
    weight = get_path(decoder_layers(model, family)[layer], family.out_proj).weight
    return weight.detach() if family.conv1d else weight.detach().T


def _through_norm(norm: nn.Module, directions: torch.Tensor, offset: float) -> torch.Tensor:
    """The linear part of a norm applied to directions [n, hidden]: centering (LayerNorm) and the
    gain. Its division by the input's scale is one positive factor per position: it scales every
    direction alike and changes no ranking."""
    d = directions.float()
    if isinstance(norm, nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    weight = getattr(norm, "weight", None)
    return d if weight is None else d * (offset + weight.detach().float())


def residual_directions(model: nn.Module, layer: int, kind: str, family: FamilyAdapter | None = None) -> torch.Tensor:
    """[intermediate, hidden]: each neuron's direction in the residual stream. ``write``: its
    output column after the norm on the MLP's output, if the family has one; ``read``: the
    direction of the residual stream its up/fc row responds to, through the norm before the MLP
    (for gated MLPs the gate row is left out)."""
    family = _family(model, family)
    block = decoder_layers(model, family)[layer]
    if kind == "write":
        norm_path, vectors = family.mlp_out_norm, write_vectors(model, layer, family)
    elif kind == "read":
        norm_path, vectors = family.mlp_in_norm, read_vectors(model, layer, family)
    else:
        raise ValueError(f"kind must be 'read' or 'write', got {kind!r}")
    if norm_path is None:
        return vectors.float()
    norm = get_path(block, norm_path)
    if kind == "read":  # the neuron reads norm(x): u . (g * x) = (u * g) . x (then centred for LayerNorm)
        d = vectors.float() * (family.norm_offset + norm.weight.detach().float())
        return d - d.mean(-1, keepdim=True) if isinstance(norm, nn.LayerNorm) else d
    return _through_norm(norm, vectors, family.norm_offset)


def to_unembedding_space(model: nn.Module, directions: torch.Tensor, family: FamilyAdapter | None = None
                         ) -> torch.Tensor:
    """Residual-stream directions [n, hidden] carried through the final modules (the final norm's
    linear part, OPT's projection) into the space the LM head reads."""
    family = _family(model, family)
    d = directions.float()
    for module in final_modules(model, family):
        if isinstance(module, nn.Linear):
            d = d @ module.weight.detach().float().T
        else:
            d = _through_norm(module, d, family.norm_offset)
    return d


# ------------------------------------------------------------------------------ canonical view


def canonical(x: torch.Tensor) -> torch.Tensor:
    """The ``[rows, units]`` view of a site tensor, whatever the family's layout."""
    return x.reshape(-1, x.shape[-1])


def site_pre_hook(layer: int, fn: SiteFn) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...] | None]:
    """A forward pre-hook handing ``fn`` the canonical view of the module's first input.

    Plain tensor ops only (reshape and the caller's math), so it traces into compiled graphs."""

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if not isinstance(x, torch.Tensor):
            from kn_steer.errors import KnSteerError

            raise KnSteerError(
                f"kn-steer cannot use layer {layer}'s site input (MLP neurons or attention heads): the module received a "
                f"{type(x).__name__}, not a tensor (fused activation quantization?); serve an "
                "unquantized model"
            )
        out = fn(layer, canonical(x))
        if out is None:
            return None
        return (out.reshape(x.shape), *args[1:])

    return hook


def hook_site(model: nn.Module, fn: SiteFn, site: str = MLP_NEURONS, layers: Sequence[int] | None = None,
              family: FamilyAdapter | None = None, missing_ok: bool = False) -> list[Any]:
    """Register ``fn`` on the site of every layer (or ``layers``); returns the hook handles."""
    modules = site_modules(model, site, family, missing_ok=missing_ok)
    wanted = modules if layers is None else {l: modules[l] for l in layers if l in modules}
    return [m.register_forward_pre_hook(site_pre_hook(l, fn)) for l, m in wanted.items()]


#: ``fn(layer, stream)``: ``stream`` is the canonical ``[rows, hidden]`` view of the residual stream after
#: the layer; return what to *add* to it (same shape), or None to leave it
ResidualFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def residual_hook(layer: int, fn: ResidualFn, paired: bool) -> Callable[..., Any]:
    """A forward hook on a decoder layer that adds ``fn``'s delta to the stream it outputs.

    ``paired``: the layer returns ``(hidden, residual)`` (vLLM) and the stream is their sum; the
    delta goes into ``residual``, so the next layer's fused add-norm (or the final norm) sees it.
    Otherwise the layer returns the stream, alone or first in a tuple (transformers)."""

    def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
        if paired:
            hidden, residual = out[0], out[1]
            delta = fn(layer, canonical(hidden + residual))
            return out if delta is None else (hidden, residual + delta.reshape(residual.shape), *out[2:])
        stream = out[0] if isinstance(out, tuple) else out
        delta = fn(layer, canonical(stream))
        if delta is None:
            return None
        stream = stream + delta.reshape(stream.shape)
        return (stream, *out[1:]) if isinstance(out, tuple) else stream

    return hook


def hook_residual(model: nn.Module, fn: ResidualFn, paired: bool = False, layers: Sequence[int] | None = None,
                  family: FamilyAdapter | None = None) -> list[Any]:
    """Register ``fn`` on the residual stream after every decoder layer (or ``layers``)."""
    family = _family(model, family)
    blocks = decoder_layers(model, family)
    wanted = range(len(blocks)) if layers is None else layers
    return [blocks[l].register_forward_hook(residual_hook(l, fn, paired)) for l in wanted]


#: ``fn(layer, fires)``: ``fires`` is a boolean ``[rows, units]`` view (rows as for sites)
FiringFn = Callable[[int, torch.Tensor], None]


def hook_firing(model: nn.Module, fn: FiringFn, family: FamilyAdapter | None = None) -> list[Any]:
    """Register ``fn`` to receive, per layer, which neurons *fire* on each token.

    Gated MLPs (SiLU, GELU) have no exact zero, so a neuron fires when its gate is open: the gate
    projection's output is positive, which is where SiLU and GELU turn positive (LAPE's definition,
    Tang et al. 2024). The neuron's value ``act(gate) * up`` is not used: its sign also carries
    ``up``'s. Non-gated MLPs fire where ``act(fc(x)) > 0``, the site itself."""
    family = _family(model, family)
    if not family.gated:
        def on_site(layer: int, rows: torch.Tensor) -> None:
            fn(layer, rows > 0)  # read only: never hand a replacement back

        return hook_site(model, on_site, family=family)
    if family.gate_proj is None:
        raise ValueError(f"family {family.family!r} is gated but its table row names no gate projection")

    def gate_hook(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
            fn(layer, canonical(out) > 0)
        return hook

    layers = decoder_layers(model, family)
    return [get_path(layer, family.gate_proj).register_forward_hook(gate_hook(i)) for i, layer in enumerate(layers)]


def remove_hooks(handles: Sequence[Any]) -> None:
    for handle in handles:
        handle.remove()
