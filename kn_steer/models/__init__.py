"""Models: the family table, sites inside a model, and checkpoints resolved without a network."""

from kn_steer.models.checkpoints import (
    DEFAULT_MODEL,
    IDENTITY_FILE,
    Dtype,
    ModelRef,
    cache_dir,
    compute_fingerprint,
    load_hf_model,
    prepare_default_model,
    resolve_model,
)
from kn_steer.models.families import (
    FamilyAdapter,
    ModelShape,
    adapter_for_config,
    supported_architectures,
)

__all__ = [
    "DEFAULT_MODEL", "IDENTITY_FILE", "Dtype", "ModelRef", "cache_dir", "compute_fingerprint",
    "load_hf_model", "prepare_default_model", "resolve_model",
    "FamilyAdapter", "ModelShape", "adapter_for_config", "supported_architectures",
]
