"""Resumable localization runs: per-example results are checkpointed, the set written atomically.

While running, each finished example is appended to ``OUT.partial.jsonl`` (next to the output
``OUT.json``) and flushed + fsynced, so an interruption loses at most the example in progress.
The first line is a header with the method, the parameters that affect per-example results, and
the model fingerprint; a checkpoint whose header differs is refused with a message (delete it or
rerun with the same settings). Each result line carries the example id and a hash of the
example's content, so a changed example is recomputed. On success the neuron set is written
atomically to ``OUT.json`` and the checkpoint is renamed to ``OUT.examples.jsonl``: the
per-example results (for ``kn`` the per-fact neuron sets) stay available for inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel

from kn_steer.errors import KnSteerError
from kn_steer.fileio import sha256_file
from kn_steer.localize.examples import check_targets
from kn_steer.localize.methods import Context, ExampleResult, MethodSpec, get_method
from kn_steer.sets.format import MethodInfo, NeuronSet, Provenance, model_identity

CHECKPOINT_VERSION = 1


def checkpoint_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".partial.jsonl")


def examples_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".examples.jsonl")


def example_hash(example: Any) -> str:
    return hashlib.sha256(example.key_text().encode("utf-8")).hexdigest()[:16]


def _header(method: MethodSpec, params: BaseModel, fingerprint: str) -> dict[str, Any]:
    dumped = params.model_dump()
    return {
        "kind": "kn-steer/localize-checkpoint", "version": CHECKPOINT_VERSION,
        "method": method.name, "fingerprint": fingerprint,
        "params": {k: dumped[k] for k in method.checkpoint_params},
    }


class Checkpoint:
    """An append-only JSONL of finished examples, keyed by id and content hash."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.done: dict[str, tuple[str, ExampleResult]] = {}
        if path.exists() and path.stat().st_size > 0:
            self._load(header)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")
            self._append(header)

    def _load(self, header: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        try:
            found = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            found = None
        if found != header:
            raise KnSteerError(
                f"checkpoint {self.path} was made by a different run "
                f"({_summary(found)}; this run: {_summary(header)}); delete it to start over, "
                "or rerun with the same method, model and parameters to resume"
            )
        good = len(lines[0])
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                result = ExampleResult.model_validate(entry["result"])
            except (json.JSONDecodeError, KeyError, ValueError):
                break  # a line cut by the interruption: drop it and what follows
            if not line.endswith("\n"):
                break
            self.done[entry["id"]] = (entry["hash"], result)
            good += len(line)
        with self.path.open("r+b") as handle:  # cut a torn tail so appends stay line-aligned
            handle.truncate(len("".join(lines)[:good].encode("utf-8")))

    def _append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def get(self, example_id: str, digest: str) -> ExampleResult | None:
        hit = self.done.get(example_id)
        return hit[1] if hit is not None and hit[0] == digest else None

    def add(self, example_id: str, digest: str, result: ExampleResult) -> None:
        self._append({"id": example_id, "hash": digest, "result": result.model_dump()})
        self.done[example_id] = (digest, result)


def _summary(header: Any) -> str:
    if not isinstance(header, dict):
        return "unreadable header"
    return f"method {header.get('method')!r}, model {header.get('fingerprint')}, params {header.get('params')}"


@dataclass
class RunInfo:
    """Where the data came from and what to call the result."""

    name: str
    data_file: str | None = None
    description: str = ""
    command: str | None = None


def run_localization(
    method: str | MethodSpec,
    params: BaseModel,
    examples: Sequence[Any],
    model: Any,
    tokenizer: Any,
    model_ref: Any,
    out: str | os.PathLike,
    info: RunInfo,
    *,
    step_chunk: int | None = None,
    progress: bool = True,
) -> NeuronSet:
    """Score every example (resuming from the checkpoint), select, and write the neuron set."""
    spec = get_method(method) if isinstance(method, str) else method
    out = Path(out)
    if out.suffix != ".json":
        raise KnSteerError(f"output {out} must be a .json file")
    check_targets(examples, tokenizer, info.data_file or "")
    identity = model_identity(model_ref, model.config)
    checkpoint = Checkpoint(checkpoint_path(out), _header(spec, params, model_ref.fingerprint))
    ctx = Context(model=model, tokenizer=tokenizer, step_chunk=step_chunk)
    results: list[ExampleResult] = []
    from tqdm.auto import tqdm

    ids = [ex.id if ex.id is not None else f"#{i + 1}" for i, ex in enumerate(examples)]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise KnSteerError(f"example id {dup!r} occurs more than once in {info.data_file or 'the data'}")
    bar = tqdm(list(zip(ids, examples)), desc=f"localize {spec.name}", unit="ex", disable=not progress)
    reused = 0
    for example_id, example in bar:
        digest = example_hash(example)
        result = checkpoint.get(example_id, digest)
        if result is None:
            result = spec.score_example(ctx, example, params)
            checkpoint.add(example_id, digest, result)
        else:
            reused += 1
        results.append(result)
    bar.close()
    selection = spec.select(results, params)
    neuron_set = NeuronSet(
        name=info.name, description=info.description or f"{spec.description} on {info.data_file}",
        model=identity, method=MethodInfo(name=spec.name, params=params.model_dump()),
        operation=selection.operation, neurons=selection.neurons,
        provenance=Provenance(
            data_file=info.data_file,
            data_sha256=sha256_file(info.data_file) if info.data_file and Path(info.data_file).is_file() else None,
            examples=len(examples), command=info.command,
        ),
        metrics={**selection.metrics, "resumed_examples": reused},
    )
    neuron_set.save(out)
    os.replace(checkpoint.path, examples_path(out))
    return neuron_set
