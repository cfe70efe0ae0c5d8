"""Corpus statistics of every neuron (firing rate, mean, max, per group of texts) and per-text
activations, computed through vLLM (:mod:`.engine`) or transformers hooks (:mod:`.reference`),
written as one file format (:mod:`.format`). ``kn-steer stats`` drives it; corpus methods
consume it (the relation method's activation pass runs on :class:`.engine.ActivationEngine`
with ``--backend vllm``)."""

from kn_steer.activations.corpus import DEFAULT_GROUP, TokenCorpus, token_corpus
from kn_steer.activations.format import ActivationStats, StatsHeader

__all__ = ["ActivationStats", "DEFAULT_GROUP", "StatsHeader", "TokenCorpus", "token_corpus"]
