"""Spelling-out (knowledge neurons of a word's letters) as the knowledge-neuron protocol over
spelling facts instead of PARAREL.

"Spelling-out is not straightforward" finds that models recover a token's characters late:
beyond the first letter the knowledge appears in intermediate and high layers. Here the facts are
"the first / second letter of WORD" (:mod:`kn_steer.data.spelling`, words from a text file), the
letter position plays the part of the relation, and everything else is the knowledge protocol:
known facts, the ``kn`` method per fact, suppress and enhance against matched and uniform random
neurons. :func:`layer_profile` says where each position's neurons sit.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import Field

from kn_steer.data.spelling import TEMPLATES, load_words, spelling_prompts
from kn_steer.eval.protocols.knowledge import KnowledgeConfig, KnowledgeProtocol
from kn_steer.localize.methods.kn import KNExample


class SpellingConfig(KnowledgeConfig):
    relations: list[str] = Field(default_factory=lambda: list(TEMPLATES), description="letter positions")
    facts: int = Field(100, ge=1, description="known spelling facts (round-robin over positions)")
    scan: int = Field(300, ge=1, description="words screened (the first of the hashed order)")
    min_length: int = Field(4, ge=2)
    max_length: int = Field(9, ge=2)


class SpellingProtocol(KnowledgeProtocol):
    """``folder`` is the text JSONL the words come from."""

    config: SpellingConfig

    def candidates(self) -> list[KNExample]:
        cfg = self.config
        words = load_words(self.folder, cfg.min_length, cfg.max_length)[: cfg.scan]
        out = []
        for position in cfg.relations:
            for word in words:
                prompts, target = spelling_prompts(word, position, cfg.paraphrases)
                out.append(KNExample(id=f"{position}:{word}", prompts=prompts, target=target,
                                     meta={"relation": position, "subject": word}))
        return out

    def run(self) -> dict[str, Any]:
        result = super().run()
        result["protocol"] = "spelling"
        result["layer_profile"] = layer_profile(result["per_fact"], self.config.relations, self.shape.num_layers)
        return result


def layer_profile(per_fact: Sequence[dict[str, Any]], positions: Sequence[str], num_layers: int) -> dict[str, Any]:
    """Per letter position: knowledge neurons per layer (summed over facts), the share in each
    third of the layers, and the mean layer."""
    out: dict[str, Any] = {}
    for position in positions:
        counts = [0] * num_layers
        for row in per_fact:
            if row["relation"] == position:
                for layer, n in row["layers"].items():
                    counts[int(layer)] += n
        total = sum(counts)
        thirds = [range(0, num_layers // 3), range(num_layers // 3, 2 * num_layers // 3), range(2 * num_layers // 3, num_layers)]
        out[position] = {
            "per_layer": counts, "neurons": total,
            "share_by_third": [sum(counts[i] for i in t) / total if total else None for t in thirds],
            "mean_layer": sum(i * c for i, c in enumerate(counts)) / total if total else None,
        }
    return out


__all__ = ["SpellingConfig", "SpellingProtocol", "layer_profile"]
