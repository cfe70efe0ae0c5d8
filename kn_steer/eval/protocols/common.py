"""What the PARAREL protocols share: one model, one data folder, and cache keys naming both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kn_steer.data.common import content_sha256
from kn_steer.eval.cache import SCORING_VERSION, ResultCache, cache_key
from kn_steer.models.families import ModelShape


class FolderProtocol:
    """A protocol over a model and a data folder; every result key names the model fingerprint,
    the folder's content hash and :data:`SCORING_VERSION`."""

    def __init__(self, model: Any, tokenizer: Any, ref: Any, folder: str | Path, cache: ResultCache,
                 progress: bool = True) -> None:
        self.model, self.tokenizer, self.ref = model, tokenizer, ref
        self.folder = Path(folder)
        self.cache = cache
        self.progress = progress
        self.shape = ModelShape.from_config(model.config)
        self.folder_sha = content_sha256(self.folder)

    def _key(self, kind: str, **parts: Any) -> str:
        return cache_key(kind=kind, version=SCORING_VERSION, model=self.ref.fingerprint, data=self.folder_sha, **parts)
