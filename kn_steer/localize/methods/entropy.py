"""``entropy``: entropy neurons, read from the weights (a weights method).

Stolfo et al. (confidence-regulation neurons) find last-layer neurons with a large output norm that
write mostly into the LM head's effective null space: they barely move any logit directly, but they
change the residual's norm, hence the final norm's scale, hence how peaked the output is. Each
neuron of ``layer`` is scored by the norm of its write direction's part in the ``null_dims``
right-singular directions of the LM head with the smallest singular values (directions carried
through the final norm's gain, and Gemma's norm on the MLP output,
:func:`kn_steer.localize.vocabulary.null_space_writes`); the top ``top`` form the set, deactivated
(clamped to 0) by default. What ablating them does to entropy and loss is measured by
:mod:`kn_steer.eval.protocols.entropy`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from kn_steer.errors import KnSteerError
from kn_steer.localize.methods.base import Context, Selection, WeightMethod
from kn_steer.localize.vocabulary import null_space_writes
from kn_steer.sets.format import Neuron, Operation


class EntropyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = Field(-1, description="the layer searched (negative: from the end; -1 is the last)")
    null_dims: int = Field(10, ge=1, description="dimensions of the LM head's effective null space")
    top: int = Field(10, ge=1, description="neurons in the set")
    value: float = Field(0.0, description="default operation: clamp to this value (0: ablate)")


def select(ctx: Context, params: EntropyParams) -> Selection:
    layers = ctx.model.config.num_hidden_layers
    layer = params.layer + layers if params.layer < 0 else params.layer
    if not 0 <= layer < layers:
        raise KnSteerError(f"--layer {params.layer}: the model has layers 0..{layers - 1}")
    norm, null = null_space_writes(ctx.model, layer, params.null_dims)
    top = torch.topk(null, min(params.top, null.shape[0])).indices.tolist()
    ratio = (null / norm.clamp_min(1e-12))
    return Selection(
        neurons=[Neuron(layer=layer, index=i, score=float(null[i])) for i in top],
        operation=Operation(op="clamp", value=params.value),
        metrics={"layer": layer, "null_fraction": [round(float(ratio[i]), 4) for i in top],
                 "write_norm": [round(float(norm[i]), 4) for i in top],
                 "layer_median_null_fraction": round(float(ratio.median()), 4),
                 "layer_median_write_norm": round(float(norm.median()), 4)},
    )


ENTROPY = WeightMethod(
    name="entropy",
    description="Entropy neurons: writes into the LM head's null space (Stolfo et al.)",
    params_model=EntropyParams,
    select=select,
)
