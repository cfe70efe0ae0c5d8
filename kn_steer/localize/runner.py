"""Localization runs: a method over its data, written as a neuron-set file with provenance.

Per-example methods are resumable: each finished example is appended to ``OUT.partial.jsonl``
(next to the output ``OUT.json``) and flushed + fsynced, so an interruption loses at most the
example in progress. The first line is a header with the method, the parameters that affect
per-example results, and the model fingerprint; a checkpoint whose header differs is refused with
a message (delete it or rerun with the same settings). Each result line carries the example id
and a hash of the example's content, so a changed example is recomputed. On success the set is
written atomically to ``OUT.json`` and the checkpoint is renamed to ``OUT.examples.jsonl``: the
per-example results stay available for inspection, and a later run with the same method, model
and per-example parameters (say another ``--count``) reuses them.

Only this process writes the checkpoint, whoever computes the examples: a distributed run
(:mod:`kn_steer.localize.distributed`) passes a *scorer* that computes pending examples elsewhere
and hands each result back here, where it is appended as above. Lines then follow completion
order; readers key them by id, and results and selection follow the examples' order, so the set
does not depend on which worker finished first.

Corpus methods run in one pass (accumulate, then select).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from pydantic import BaseModel
from tqdm.auto import tqdm

from kn_steer.data.common import content_sha256
from kn_steer.errors import KnSteerError
from kn_steer.localize.examples import check_targets
from kn_steer.localize.methods import (
    Context,
    ExampleMethod,
    WeightMethod,
    ExampleResult,
    Method,
    Selection,
    get_method,
)
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


def checkpoint_header(method: ExampleMethod, params: BaseModel, fingerprint: str) -> dict[str, Any]:
    """What per-example results depend on: method, model and the method's checkpoint parameters."""
    dumped = params.model_dump()
    return {
        "kind": "kn-steer/localize-checkpoint", "version": CHECKPOINT_VERSION,
        "method": method.name, "fingerprint": fingerprint,
        "params": {k: dumped[k] for k in method.checkpoint_params},
    }


def _read_header(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return json.loads(handle.readline())
    except (OSError, json.JSONDecodeError):
        return None


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


class ExampleScorer(Protocol):
    """Computes pending examples, yielding ``(position, result)`` as each finishes (any order).

    ``pending`` holds ``(position in the run's examples, example)``. The runner appends every
    yielded result to the checkpoint before asking for the next, so a scorer that fails midway
    loses only what it had not yielded yet."""

    def __call__(self, method: ExampleMethod, params: BaseModel, ctx: Context,
                 pending: Sequence[tuple[int, Any]]) -> Iterable[tuple[int, ExampleResult]]: ...


def local_scorer(method: ExampleMethod, params: BaseModel, ctx: Context,
                 pending: Sequence[tuple[int, Any]]) -> Iterator[tuple[int, ExampleResult]]:
    """This process, one example after the other, on ``ctx.model``."""
    for position, example in pending:
        yield position, method.score(ctx, example, params)


def score_examples(
    method: ExampleMethod,
    params: BaseModel,
    examples: Sequence[Any],
    ctx: Context,
    fingerprint: str,
    checkpoint: str | os.PathLike,
    source: str = "",
    scorer: ExampleScorer = local_scorer,
) -> tuple[list[ExampleResult], int]:
    """Every example's result, in order, computed (by ``scorer``) or read back from
    ``checkpoint``; and how many were read back. Protocols call this with a checkpoint of their
    own (never renamed)."""
    check_targets(examples, ctx.tokenizer, source)
    ids = [ex.id if ex.id is not None else f"#{i + 1}" for i, ex in enumerate(examples)]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise KnSteerError(f"example id {dup!r} occurs more than once in {source or 'the data'}")
    store = Checkpoint(Path(checkpoint), checkpoint_header(method, params, fingerprint))
    digests = [example_hash(example) for example in examples]
    found: dict[int, ExampleResult] = {}
    for position, (example_id, digest) in enumerate(zip(ids, digests)):
        result = store.get(example_id, digest)
        if result is not None:
            found[position] = result
    reused = len(found)
    pending = [(position, example) for position, example in enumerate(examples) if position not in found]
    bar = tqdm(total=len(examples), initial=reused, desc=f"localize {method.name}", unit="ex",
               disable=not ctx.progress)
    try:
        for position, result in scorer(method, params, ctx, pending):
            store.add(ids[position], digests[position], result)
            found[position] = result
            bar.update(1)
    finally:
        bar.close()
    return [found[position] for position in range(len(examples))], reused


@dataclass
class RunInfo:
    """Where the data came from and what to call the result."""

    name: str
    data_file: str | None = None
    description: str = ""
    command: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # measured effects, added to the set's metrics
    data_sha256: str | None = None  # when ``data_file`` is a display path: the hash of the data read


def run_localization(
    method: str | Method,
    params: BaseModel,
    data: Any,
    model: Any,
    tokenizer: Any,
    model_ref: Any,
    out: str | os.PathLike,
    info: RunInfo,
    *,
    step_chunk: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    scorer: ExampleScorer | None = None,
    config: Any = None,
    activations: Any = None,
) -> NeuronSet:
    """Run ``method`` on ``data`` (a list of examples, a corpus, or None for a weights method),
    select, write the set.

    ``checkpoint``: a per-example checkpoint of the caller's own (a protocol's) to read and extend;
    it is left where it is. By default the checkpoint lives next to ``out`` (see module doc).
    ``scorer``: who computes pending examples (default: this process on ``model``); a scorer that
    holds the model elsewhere lets ``model`` be None, with ``config`` the model's config.
    ``activations``: an :class:`kn_steer.activations.engine.ActivationEngine` for a corpus method
    whose ``backends`` include ``vllm``."""
    spec = get_method(method) if isinstance(method, str) else method
    out = Path(out)
    if out.suffix != ".json":
        raise KnSteerError(f"output {out} must be a .json file")
    if scorer is not None and not isinstance(spec, ExampleMethod):
        raise KnSteerError(f"method {spec.name!r} is a corpus method (one pass over the corpus): "
                           "it runs in one process, without workers")
    config = config if config is not None else model.config
    if activations is not None and "vllm" not in getattr(spec, "backends", ()):
        raise KnSteerError(f"method {spec.name!r} computes with transformers only (no vllm backend)")
    ctx = Context(model=model, tokenizer=tokenizer, step_chunk=step_chunk, progress=progress,
                  activations=activations)
    metrics: dict[str, Any] = {}
    if isinstance(spec, ExampleMethod):
        partial = Path(checkpoint) if checkpoint is not None else checkpoint_path(out)
        finished = examples_path(out)
        header = checkpoint_header(spec, params, model_ref.fingerprint)
        if checkpoint is None and not partial.exists() and finished.exists() and _read_header(finished) == header:
            os.replace(finished, partial)  # the same per-example results: re-select from them
        results, reused = score_examples(spec, params, data, ctx, model_ref.fingerprint, partial,
                                         info.data_file or "", scorer or local_scorer)
        selection: Selection = spec.select(results, params)
        metrics["resumed_examples"] = reused
        count = len(data)
    elif isinstance(spec, WeightMethod):
        selection = spec.select(ctx, params)
        count = None  # no data: the weights are the input
    else:
        selection = spec.select(spec.accumulate(ctx, data, params), params)
        count = len(data.prompts)
    neuron_set = NeuronSet(
        name=info.name, description=info.description or f"{spec.description} on {info.data_file}",
        model=model_identity(model_ref, config), method=MethodInfo(name=spec.name, params=params.model_dump()),
        operation=selection.operation, neurons=selection.neurons, heads=selection.heads,
        directions=selection.directions,
        provenance=Provenance(
            data_file=info.data_file,
            data_sha256=info.data_sha256 or (content_sha256(info.data_file)
                                             if info.data_file and Path(info.data_file).exists() else None),
            examples=count, command=info.command,
        ),
        metrics={**selection.metrics, **metrics, **info.metrics},
    )
    neuron_set.save(out)
    if isinstance(spec, ExampleMethod) and checkpoint is None:
        os.replace(checkpoint_path(out), examples_path(out))
    return neuron_set
