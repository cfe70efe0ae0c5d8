"""``concept``: the neurons of a word, read from the weights through the LM head (a weights method).

After Davies et al., who map every neuron of Llama-3.1-8B to tokens through the LM head and clamp the
neurons of one concept to make the model talk about it: each neuron's write direction (or read
direction) is carried through the final norm into the LM head
(:mod:`kn_steer.localize.vocabulary`), and the neurons whose logits single out the word most (z-score
of its best single-token spelling among all tokens), with the word among their first ``max_rank``
tokens, form the set. The default operation clamps them to ``value``; what that does to generation is
measured by :mod:`kn_steer.eval.protocols.concept`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kn_steer.localize.methods.base import Context, Selection, WeightMethod
from kn_steer.localize.vocabulary import find_concept
from kn_steer.sets.format import Neuron, Operation


class ConceptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    word: str = Field(min_length=1, description="the concept, a word the tokenizer keeps whole in some spelling")
    direction: Literal["write", "read"] = Field("write", description="write: what a neuron promotes; read: "
                                                "what it responds to")
    top: int = Field(10, ge=1, description="neurons in the set at most")
    max_rank: int = Field(10, ge=1, description="a neuron must put the word among its first N tokens")
    value: float = Field(10.0, description="default operation: clamp to this value")


def select(ctx: Context, params: ConceptParams) -> Selection:
    found = find_concept(ctx.model, ctx.tokenizer, params.word, params.direction, params.top, params.max_rank)
    return Selection(
        neurons=[Neuron(layer=n.layer, index=n.index, score=n.z) for n in found],
        operation=Operation(op="clamp", value=params.value),
        metrics={"word_tokens": sorted({ctx.tokenizer.decode([n.token_id]) for n in found}),
                 "ranks": [n.rank for n in found]},
    )


CONCEPT = WeightMethod(
    name="concept",
    description="Neurons of a word through the LM head (Davies et al.)",
    params_model=ConceptParams,
    select=select,
)
