"""Model resolution and fingerprints, on the real default model and tiny saved checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers.tiny import build_tiny_model
from kn_steer.errors import KnSteerError
from kn_steer.models import IDENTITY_FILE, cache_dir, compute_fingerprint, resolve_model


def test_default_model_prepared(default_ref) -> None:
    path = default_ref.path
    assert default_ref.name == "smollm2-135m"
    assert default_ref.fingerprint.startswith("sha256:") and len(default_ref.fingerprint) == 7 + 32
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "tokenizer.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert "lm_head.weight" not in keys  # tied to the embedding, re-tied on load
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
    # Stable: a second resolve and a fresh hash of the files give the stored fingerprint.
    assert resolve_model("smollm2-135m").fingerprint == default_ref.fingerprint
    assert compute_fingerprint(path) == default_ref.fingerprint
    stored = json.loads((path / IDENTITY_FILE).read_text())
    assert stored == {"name": "smollm2-135m", "fingerprint": default_ref.fingerprint}


def test_cache_dir_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KN_STEER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KN_STEER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "kn-steer"


def test_default_model_knows_paris(default_hf) -> None:
    model, tokenizer = default_hf
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    continuation = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert continuation.startswith(" Paris"), continuation


def test_bad_model_paths(tmp_path: Path) -> None:
    with pytest.raises(KnSteerError, match="does-not-exist"):
        resolve_model(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KnSteerError, match="no config.json"):
        resolve_model(empty)


def test_fingerprint_ignores_dtype_but_not_weights(tmp_path: Path) -> None:
    model = build_tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    build_tiny_model("llama", seed=1).save_pretrained(tmp_path / "other")
    assert list((tmp_path / "f32").glob("*.safetensors"))
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.bfloat16

    f32, bf16, other = (resolve_model(tmp_path / n) for n in ("f32", "bf16", "other"))
    assert f32.name == "f32" and f32.path == (tmp_path / "f32").resolve()
    assert f32.fingerprint == bf16.fingerprint
    assert f32.fingerprint != other.fingerprint


def test_fingerprint_needs_weights(tmp_path: Path) -> None:
    model = build_tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(KnSteerError, match="safetensors"):
        resolve_model(tmp_path)
