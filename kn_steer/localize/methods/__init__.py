"""The localization methods, registered explicitly: a new method is a module here and one entry
in :data:`METHODS`.

* ``kn`` (:mod:`.kn`, per-example) — knowledge neurons, Dai et al. 2022
* ``kn-consistent`` (:mod:`.kn_consistent`, per-example) — consistency-aware knowledge neurons, after Chen et al.
* ``kn-multilingual`` (:mod:`.kn_multilingual`, per-example) — knowledge neurons over languages weighted by uncertainty, after MATRICE
* ``ircan`` (:mod:`.ircan`, per-example) — context-aware neurons, IRCAN
* ``relation`` (:mod:`.relation`, corpus) — relation-specific neurons by average precision
* ``concept`` (:mod:`.concept`, weights) — the neurons of a word through the LM head, Davies et al.
* ``entropy`` (:mod:`.entropy`, weights) — entropy neurons writing into the LM head's null space, Stolfo et al.
* ``dead``, ``token`` (:mod:`.firing`, corpus) — never-firing neurons and token detectors, Voita et al.
* ``language`` (:mod:`.language`, corpus) — language-specific neurons by activation-probability entropy, LAPE
* ``emotion`` (:mod:`.emotion`, corpus) — neurons tracking a rated attribute of emotion concepts, Li et al.
* ``relation-heads`` (:mod:`.relation_heads`, corpus) — a relation's attention heads by specific ablation effect
* ``diff-means`` (:mod:`.diff_means`, corpus) — a residual-stream direction from two prompt sets, Arditi et al.
"""

from __future__ import annotations

from kn_steer.errors import KnSteerError
from kn_steer.localize.methods.base import (
    Context,
    CorpusMethod,
    CorpusStats,
    ExampleMethod,
    ExampleResult,
    Method,
    ScoredNeuron,
    Selection,
    WeightMethod,
)
from kn_steer.localize.methods.concept import CONCEPT
from kn_steer.localize.methods.diff_means import DIFF_MEANS
from kn_steer.localize.methods.emotion import EMOTION
from kn_steer.localize.methods.entropy import ENTROPY
from kn_steer.localize.methods.firing import DEAD, TOKEN
from kn_steer.localize.methods.ircan import IRCAN
from kn_steer.localize.methods.kn import KN
from kn_steer.localize.methods.kn_consistent import KN_CONSISTENT
from kn_steer.localize.methods.kn_multilingual import KN_MULTILINGUAL
from kn_steer.localize.methods.language import LANGUAGE
from kn_steer.localize.methods.relation import RELATION
from kn_steer.localize.methods.relation_heads import RELATION_HEADS

METHODS: dict[str, Method] = {m.name: m for m in (KN, KN_CONSISTENT, KN_MULTILINGUAL, IRCAN, RELATION, LANGUAGE, EMOTION, DEAD, TOKEN, CONCEPT, ENTROPY,
                                             DIFF_MEANS, RELATION_HEADS)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KnSteerError(
            f"unknown localization method {name!r}; available: {', '.join(sorted(METHODS))}"
        ) from None


def available_methods() -> list[str]:
    return sorted(METHODS)


__all__ = ["Context", "CorpusMethod", "CorpusStats", "ExampleMethod", "ExampleResult", "METHODS", "Method",
           "ScoredNeuron", "Selection", "WeightMethod", "available_methods", "get_method"]
