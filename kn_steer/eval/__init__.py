"""Score multiple-choice datasets under a steering intervention (``kn-steer eval``).

``evaluate(path, format, spec=... | set_name=..., backend="hf" | "vllm")`` returns accuracy
(context-faithful choice wins), trap rate (memorised answer wins) and per-item log-probabilities;
:class:`HFEvaluator` keeps one transformers model loaded to score many conditions.
"""

from kn_steer.eval.api import EvalResult, HFEvaluator, evaluate, make_spec, summarize
from kn_steer.eval.scoring import EncodedItem, ItemScore, encode_items, score_hf

__all__ = ["EncodedItem", "EvalResult", "HFEvaluator", "ItemScore", "encode_items", "evaluate",
           "make_spec", "score_hf", "summarize"]
