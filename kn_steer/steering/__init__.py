"""Steering as data: the ``kn_steer`` request spec, its compilation to multiply-add masks, and the
transformers reference that applies them (no vLLM needed).

Imports are lazy: the serving workers load :mod:`.masks` without the schema's dependencies.
"""

_EXPORTS = {
    "compile_spec": "kn_steer.steering.compile", "CompiledSteering": "kn_steer.steering.masks",
    "SparseMask": "kn_steer.steering.masks", "dense_mask": "kn_steer.steering.masks",
    "Intervention": "kn_steer.steering.spec", "SteeringSpec": "kn_steer.steering.spec",
    "parse_spec": "kn_steer.steering.spec", "RequestLimits": "kn_steer.steering.limits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
