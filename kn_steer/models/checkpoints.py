"""Model resolution without network: named models prepared from GGUF packages, and fingerprints.

A *named model* (``smollm2-135m``, ``gemma3-270m``: see :mod:`kn_steer.models.catalog`) comes as a
GGUF in a pip package. It is dequantized once into a plain safetensors checkpoint in a cache folder
that vLLM and transformers both load, with the tokenizer fixed as the catalog says. A
*fingerprint* identifies the weights a neuron set was found on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kn_steer.errors import KnSteerError
from kn_steer.models.catalog import CATALOG, CatalogModel

DEFAULT_MODEL = "smollm2-135m"
IDENTITY_FILE = "kn-steer-model.json"
Dtype = Literal["float32", "bfloat16"]
# Fingerprint samples this many evenly spaced values per tensor, rounded to bfloat16, so float32
# and bfloat16 copies of one model agree and a 70B checkpoint hashes as fast as a 135M one.
_FINGERPRINT_SAMPLES = 4096
_CONFIG_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "n_inner",
    "ffn_dim", "hidden_act", "activation_function",
)


def cache_dir() -> Path:
    """``$KN_STEER_CACHE``, else ``$XDG_CACHE_HOME/kn-steer``, else ``~/.cache/kn-steer``."""
    if env := os.environ.get("KN_STEER_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kn-steer"


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: a local checkpoint folder, its display name and fingerprint."""

    name: str
    path: Path
    fingerprint: str


def _entry(name: str) -> CatalogModel:
    if name not in CATALOG:
        raise KnSteerError(f"unknown model {name!r}; named models: {', '.join(CATALOG)}")
    return CATALOG[name]


def prepared_path(name: str, dtype: Dtype = "float32") -> Path:
    """Where the prepared checkpoint of a named model lives (whether or not it exists yet)."""
    return cache_dir() / f"{name}-{dtype}"


def prepare_model(name: str, dtype: Dtype = "float32", force: bool = False) -> Path:
    """Dequantize a named model's GGUF into ``cache_dir()/<name>-<dtype>`` (idempotent, atomic)."""
    entry = _entry(name)
    if dtype not in entry.dtypes:
        raise KnSteerError(f"model {name!r} is prepared in {', '.join(entry.dtypes)}, not {dtype!r}")
    target = prepared_path(name, dtype)
    if (target / IDENTITY_FILE).is_file() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf = entry.source.materialize(staging / "gguf")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if entry.add_bos_token:
            tokenizer.add_bos_token = True  # rewrites the post-processor that tokenizer.json saves
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        if type(model).__name__ != entry.architecture:
            raise KnSteerError(f"{gguf.name} loads as {type(model).__name__}, the catalog says "
                               f"{entry.architecture}: fix the entry for {name!r}")
        checkpoint = staging / "checkpoint"
        _save_plain_checkpoint(model, checkpoint, dtype)
        del model
        tokenizer.save_pretrained(checkpoint)
        if entry.add_bos_token:
            _declare_add_bos(checkpoint)
        _check_tokenizer(checkpoint, entry)
        _write_identity(checkpoint, name)
        _usual_modes(checkpoint)
        if target.exists():
            if (target / IDENTITY_FILE).is_file() and not force:
                return target  # another process prepared it meanwhile
            shutil.rmtree(target)
        os.replace(checkpoint, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prepare_default_model(dtype: Dtype = "float32", force: bool = False) -> Path:
    """The default model's prepared checkpoint (see :func:`prepare_model`)."""
    return prepare_model(DEFAULT_MODEL, dtype, force)


def _declare_add_bos(folder: Path) -> None:
    """Also say ``add_bos_token`` in tokenizer_config.json: transformers 5 adds <bos> through the
    post-processor saved in tokenizer.json, older versions (and readers of the config) by the flag."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["add_bos_token"] = True
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _usual_modes(folder: Path) -> None:
    """The umask's modes, not mkdtemp's 0700 (and safetensors' 0600): the cache is shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _check_tokenizer(folder: Path, entry: CatalogModel) -> None:
    """The saved tokenizer, reloaded as transformers and vLLM load it, adds <bos> if it must."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    if entry.add_bos_token and (tokenizer.bos_token_id is None or ids[0] != tokenizer.bos_token_id):
        raise KnSteerError(f"the prepared tokenizer of {entry.name!r} does not add <bos> "
                           f"(ids {ids}); the transformers version may save the flag differently")


def _save_plain_checkpoint(model: Any, folder: Path, dtype: str) -> None:
    """Write config + safetensors by hand: transformers refuses to re-save a GGUF-loaded model.

    The tied ``lm_head.weight`` is left out (vLLM and transformers re-tie it from the embedding).
    """
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _write_identity(folder: Path, name: str) -> dict[str, Any]:
    identity = {"name": name, "fingerprint": compute_fingerprint(folder)}
    (folder / IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
    return identity


def compute_fingerprint(folder: str | os.PathLike) -> str:
    """Hash of the architecture config and a bfloat16-rounded sample of every weight tensor."""
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    digest = hashlib.sha256()
    digest.update(json.dumps({k: config.get(k) for k in _CONFIG_KEYS}, sort_keys=True).encode())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KnSteerError(f"{folder}: no *.safetensors weights to fingerprint")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in sorted(handle.keys()):
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                flat = handle.get_tensor(key).reshape(-1)
                step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
                sample = flat[::step][:_FINGERPRINT_SAMPLES].to(torch.bfloat16).view(torch.int16)
                digest.update(key.encode())
                digest.update(str(tuple(handle.get_slice(key).get_shape())).encode())
                digest.update(sample.numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def resolve_model(model: str | os.PathLike = DEFAULT_MODEL, dtype: Dtype = "float32") -> ModelRef:
    """A named model (prepared on first use) or a local transformers checkpoint folder."""
    if str(model) in CATALOG:
        path = prepare_model(str(model), dtype)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise KnSteerError(
                f"model {str(model)!r} is neither a named model ({', '.join(CATALOG)}) "
                "nor an existing folder"
            )
        if not (path / "config.json").is_file():
            raise KnSteerError(f"model folder {path} has no config.json")
    identity_file = path / IDENTITY_FILE
    if identity_file.is_file():
        identity = json.loads(identity_file.read_text())
    else:
        identity = {"name": path.name, "fingerprint": compute_fingerprint(path)}
    return ModelRef(name=identity["name"], path=path.resolve(), fingerprint=identity["fingerprint"])


def load_tokenizer(ref: ModelRef):
    """The model's tokenizer as localization and evaluation use it (vLLM loads the same files)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref.path)


def load_hf_model(ref: ModelRef, dtype: str = "float32", device: str = "cpu", device_map: Any = None):
    """(model, tokenizer) in eval mode with gradients off for the weights.

    ``device_map`` (accelerate's: ``auto``, ``balanced``, ``sequential`` or a dict) splits the
    model over devices instead of putting it on ``device``: for a model larger than one device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kn_steer.models.families import adapter_for_config

    adapter_for_config(AutoConfig.from_pretrained(ref.path))  # fail early on unsupported families
    tokenizer = load_tokenizer(ref)
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype), device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype)).to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer
