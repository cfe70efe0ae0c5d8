"""The corpus-statistics file: every neuron's firing count, sum and maximum over a corpus, per group.

One ``.npz`` (numpy's zip of arrays) holding a JSON ``header`` (:class:`StatsHeader`: model,
corpus, what was counted, how) and three ``[groups, layers, units]`` arrays:

* ``fires``: tokens on which the neuron's value exceeded ``threshold``;
* ``sums``: the sum of its values (float64);
* ``maxes``: its largest value (float32; ``-inf`` for a group with no token).

``tokens[g]`` says over how many tokens group ``g`` was counted, so the firing rate is
``fires / tokens`` and the mean ``sums / tokens`` (:meth:`ActivationStats.fire_rate`,
:meth:`ActivationStats.mean`). A group is a group of texts (``by: text``), or, for per-position
and per-token-id summaries, one token position or one token id (``by``; ``keys`` names each). The value counted is the neuron's, the input of the MLP's output
projection (``act(gate(x)) * up(x)``), the same unit steering and read-back address; a neuron
*fires* when that value exceeds ``threshold`` (default 0). Methods that define firing by the gate
alone (LAPE's "gate open") count with their own pass (:mod:`kn_steer.localize.firing`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kn_steer.errors import DataError
from kn_steer.fileio import atomic_write_bytes
from kn_steer.sets.format import ModelIdentity

FORMAT = "kn-steer.activation-stats/1"
ARRAYS = ("fires", "sums", "maxes")


class StatsHeader(BaseModel):
    """What the arrays count, and how they were made (enough to redo the run)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["kn-steer.activation-stats/1"] = FORMAT
    model: ModelIdentity
    groups: list[str] = Field(min_length=1)
    tokens: list[int]
    texts: list[int]
    threshold: float
    positions: Literal["all", "last"] = Field(
        description="all: every token of each text as the model sees it (<bos> included); last: its last token")
    max_tokens: int = Field(ge=1, description="tokens kept per text (the first N)")
    backend: Literal["vllm", "hf"]
    data_file: str | None = None
    data_sha256: str | None = None
    group_field: str | None = None
    by: Literal["text", "position", "token"] = Field(
        "text", description="what a group is: a group of texts (group_field), a token position, or a token id")
    keys: list[int] | None = Field(None, description="by position/token: each group's position or token id "
                                                       "(-1: every other token)")
    command: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "StatsHeader":
        if not len(self.groups) == len(self.tokens) == len(self.texts):
            raise ValueError("groups, tokens and texts must have one entry per group")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError("group names must be distinct")
        if (self.keys is None) != (self.by == "text") or (self.keys is not None and len(self.keys) != len(self.groups)):
            raise ValueError("keys: one per group when groups are positions or token ids, none otherwise")
        return self


@dataclass
class ActivationStats:
    """A header and its ``[groups, layers, units]`` arrays (see the module docstring)."""

    header: StatsHeader
    fires: np.ndarray
    sums: np.ndarray
    maxes: np.ndarray

    def __post_init__(self) -> None:
        shape = (len(self.header.groups), self.header.model.num_layers, self.header.model.intermediate_size)
        for name in ARRAYS:
            if getattr(self, name).shape != shape:
                raise DataError(f"activation stats: {name} has shape {getattr(self, name).shape}, the header says {shape}")
        self.fires = self.fires.astype(np.int64, copy=False)
        self.sums = self.sums.astype(np.float64, copy=False)
        self.maxes = self.maxes.astype(np.float32, copy=False)

    def group(self, name: str) -> int:
        try:
            return self.header.groups.index(name)
        except ValueError:
            raise DataError(f"activation stats: no group {name!r} (have {', '.join(self.header.groups)})") from None

    def _per_token(self) -> np.ndarray:
        tokens = np.asarray(self.header.tokens, dtype=np.float64)
        return np.where(tokens > 0, tokens, np.nan)[:, None, None]

    def fire_rate(self) -> np.ndarray:
        """``[groups, layers, units]``: share of the group's tokens on which each neuron fired."""
        return self.fires / self._per_token()

    def mean(self) -> np.ndarray:
        """``[groups, layers, units]``: each neuron's mean value over the group's tokens."""
        return self.sums / self._per_token()

    def save(self, path: str | Path) -> Path:
        """Write atomically (a finished run is never left half-written)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise DataError(f"{path}: activation statistics are written as .npz")
        buffer = io.BytesIO()
        np.savez_compressed(buffer, header=np.array(self.header.model_dump_json()),
                            **{name: getattr(self, name) for name in ARRAYS})
        return atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("header", *ARRAYS) if k not in data.files]
                if missing:
                    raise DataError(f"{path}: not an activation-stats file (missing {', '.join(missing)})")
                header = StatsHeader.model_validate(json.loads(str(data["header"])))
                arrays = {name: data[name] for name in ARRAYS}
        except (OSError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            if isinstance(exc, ValidationError):
                raise DataError(f"{path}: invalid header: {exc.errors()[0]['msg']}") from None
            raise DataError(f"{path}: cannot read activation statistics ({exc})") from None
        return cls(header, **arrays)
