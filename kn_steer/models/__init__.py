"""Models: the family table, sites inside a model, named models and checkpoints resolved offline."""

from kn_steer.models.catalog import CATALOG, CatalogModel, GgufSource
from kn_steer.models.checkpoints import (
    DEFAULT_MODEL,
    IDENTITY_FILE,
    Dtype,
    ModelRef,
    cache_dir,
    compute_fingerprint,
    load_hf_model,
    load_tokenizer,
    prepare_default_model,
    prepare_model,
    prepared_path,
    resolve_model,
)
from kn_steer.models.families import (
    FamilyAdapter,
    ModelShape,
    adapter_for_config,
    supported_architectures,
)

__all__ = [
    "CATALOG", "CatalogModel", "GgufSource",
    "DEFAULT_MODEL", "IDENTITY_FILE", "Dtype", "ModelRef", "cache_dir", "compute_fingerprint",
    "load_hf_model", "load_tokenizer", "prepare_default_model", "prepare_model", "prepared_path", "resolve_model",
    "FamilyAdapter", "ModelShape", "adapter_for_config", "supported_architectures",
]
