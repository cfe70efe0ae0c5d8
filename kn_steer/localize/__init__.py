"""Offline localization of MLP neurons: exact, fast integrated gradients and the methods on top.

* :mod:`~kn_steer.localize.engine` — ``attribute`` / ``attribute_ids``: integrated gradients of
  every neuron of every layer in one batched forward/backward over the last prompt position
  (exact: equals the per-layer reference up to float rounding).
* :mod:`~kn_steer.localize.recorder` — activations read back at each prompt's last token.
* :mod:`~kn_steer.localize.ranking` — average precision of every neuron as a label detector.
* :mod:`~kn_steer.localize.methods` — the methods (``kn``, ``ircan``: per-example; ``relation``:
  corpus), registered explicitly.
* :mod:`~kn_steer.localize.runner` — runs writing a neuron-set file (per-example ones resumable).
* :mod:`~kn_steer.localize.distributed` — per-example runs sharded over Ray actors (``--workers``),
  checkpointed by the driver; imported only when used (Ray is an optional extra).

First-order mode (``first_order=True``) is gradient x (a - a') at the actual activation, one
forward and one backward for all layers: an APPROXIMATION of integrated gradients (it equals IG
with a single step at the end point, which the tests check). Measured on SmolLM2-135M-Instruct,
MemoTrap dev examples, against 20-step IG (``benchmarks/bench_localize.py``): Spearman rank
correlation over all 46,080 neurons 0.89-0.94, but only 55-70% of the top 20 neurons agree. The
bulk ranking is close, the selected few differ: use it to scan, and IG to choose a set.
"""

from kn_steer.localize.engine import (
    Attribution,
    attribute,
    attribute_ids,
    encode_prompt,
    encode_target,
)
from kn_steer.localize.examples import Example, load_examples
from kn_steer.localize.methods import (
    METHODS,
    Context,
    CorpusMethod,
    CorpusStats,
    ExampleMethod,
    ExampleResult,
    Method,
    ScoredNeuron,
    Selection,
    available_methods,
    get_method,
)
from kn_steer.localize.methods.ircan import IRCANExample, IRCANParams
from kn_steer.localize.methods.kn import KNExample, KNParams
from kn_steer.localize.methods.relation import RelationCorpus, RelationParams
from kn_steer.localize.runner import RunInfo, run_localization, score_examples

__all__ = [
    "Attribution", "attribute", "attribute_ids", "encode_prompt", "encode_target",
    "Example", "load_examples",
    "METHODS", "Context", "CorpusMethod", "CorpusStats", "ExampleMethod", "ExampleResult", "Method",
    "ScoredNeuron", "Selection", "available_methods", "get_method",
    "IRCANExample", "IRCANParams", "KNExample", "KNParams", "RelationCorpus", "RelationParams",
    "RunInfo", "run_localization", "score_examples",
]
