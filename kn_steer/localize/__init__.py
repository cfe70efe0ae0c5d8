"""Offline localization of MLP neurons: exact, fast integrated gradients and the methods on top.

* :mod:`~kn_steer.localize.engine` — ``attribute`` / ``attribute_ids``: integrated gradients of
  every neuron of every layer in one batched forward/backward over the last prompt position
  (exact: equals the per-layer reference up to float rounding).
* :mod:`~kn_steer.localize.examples` — ``KNExample``, ``IRCANExample`` and their JSONL loaders.
* :mod:`~kn_steer.localize.methods` — the method registry (``kn``, ``ircan``; others plug in).
* :mod:`~kn_steer.localize.runner` — resumable runs writing a neuron-set file.

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
from kn_steer.localize.examples import IRCANExample, KNExample, load_examples
from kn_steer.localize.methods import (
    Context,
    ExampleResult,
    MethodSpec,
    ScoredNeuron,
    Selection,
    available_methods,
    get_method,
    register_method,
)
from kn_steer.localize.runner import RunInfo, run_localization

__all__ = [
    "Attribution", "attribute", "attribute_ids", "encode_prompt", "encode_target",
    "IRCANExample", "KNExample", "load_examples",
    "Context", "ExampleResult", "MethodSpec", "ScoredNeuron", "Selection",
    "available_methods", "get_method", "register_method",
    "RunInfo", "run_localization",
]
