"""Evaluation: scoring under an intervention, random controls, paired statistics, protocols.

* :mod:`~kn_steer.eval.scoring` — multiple-choice scoring under three rules (total,
  length-normalized, calibrated); :mod:`~kn_steer.localize.prompt_scores` — next-token scoring of fact prompts.
* :mod:`~kn_steer.eval.controls` — random neurons matched to a set's per-layer counts, or uniform.
* :mod:`~kn_steer.eval.summary` — accuracies per rule and by relative length, McNemar tests.
* :mod:`~kn_steer.eval.cache` — the one result cache of long runs.
* :mod:`~kn_steer.eval.api` — ``evaluate`` (``kn-steer eval``) and :class:`HFEvaluator`.
* :mod:`~kn_steer.eval.protocols` — the papers' evaluations (IRCAN, relation, knowledge neurons).
"""

from kn_steer.eval.api import EvalResult, HFEvaluator, evaluate, make_spec
from kn_steer.eval.scoring import RULES, EncodedItem, ItemScore, encode_items, score_hf
from kn_steer.eval.summary import paired, summarize

__all__ = ["RULES", "EncodedItem", "EvalResult", "HFEvaluator", "ItemScore", "encode_items", "evaluate",
           "make_spec", "paired", "score_hf", "summarize"]
