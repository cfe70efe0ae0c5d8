"""Steering as data: the ``kn_steer`` request spec, its compilation to multiply-add masks, and the
transformers reference that applies them (no vLLM needed)."""

from kn_steer.steering.compile import compile_spec
from kn_steer.steering.masks import CompiledSteering, SparseMask, dense_mask
from kn_steer.steering.spec import Intervention, SteeringSpec, parse_spec

__all__ = ["CompiledSteering", "Intervention", "SparseMask", "SteeringSpec", "compile_spec", "dense_mask",
           "parse_spec"]
