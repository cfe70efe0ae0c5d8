"""Offline A/B: every arm of an experiment over a labelled dataset, scored through a running server.

Each item is scored the way the evaluation does it: the total log-probability of each candidate
continuation given the prompt, read from the server's ``/v1/completions`` with ``echo`` and
``logprobs`` (``max_tokens=0``: the prompt is scored, nothing is generated). Prompt and
continuation are tokenized separately by the server's ``/tokenize`` (the prompt with the
tokenizer's special tokens, the continuation without: the convention of :mod:`kn_steer.tokens`)
and sent as token ids, so the continuation's
tokens are exactly known. An item is a success when the context-faithful choice
scores highest. Each (arm, item) becomes an assignment record plus an outcome record in the log;
a re-run skips pairs already logged, so an interrupted run resumes.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from kn_steer.ab.config import Arm, Experiment
from kn_steer.ab.log import AssignmentLog, AssignmentRecord, iter_records, now_iso
from kn_steer.data.common import ChoiceItem
from kn_steer.errors import KnSteerError

DataFormat = Literal["memotrap", "kre"]


def load_items(path: str | Path, fmt: DataFormat, limit: int | None = None) -> list[ChoiceItem]:
    if fmt == "memotrap":
        from kn_steer.data.memotrap import load_memotrap as loader
    elif fmt == "kre":
        from kn_steer.data.kre import load_kre as loader
    else:
        raise KnSteerError(f"unknown data format {fmt!r} (memotrap or kre)")
    items = loader(path)
    if not items:
        raise KnSteerError(f"{path}: no items")
    return items[:limit] if limit is not None else items


class ServerScorer:
    """Scores continuations through one OpenAI-compatible kn-steer server."""

    def __init__(self, server: str, model: str | None = None, timeout: float = 600.0):
        import httpx

        base = server.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.client = httpx.Client(base_url=base, timeout=timeout)
        try:
            models = self._json("GET", "/v1/models")
        except KnSteerError as exc:
            raise KnSteerError(f"cannot reach the server at {server}: {exc}") from exc
        self.model = model or models["data"][0]["id"]

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            resp = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise KnSteerError(f"{method} {path}: {exc}") from exc
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - any non-JSON error body
                message = resp.text[:500]
            raise KnSteerError(f"{method} {path}: HTTP {resp.status_code}: {message}")
        return resp.json()

    def tokenize(self, text: str, special: bool) -> list[int]:
        out = self._json("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": special})
        return list(out["tokens"])

    def score(self, prompt_ids: list[int], choice_ids: Sequence[list[int]],
              spec: dict[str, Any] | None) -> tuple[list[float], dict[str, Any], str, float]:
        """(log-probability per choice, usage, response id, latency) in one request."""
        body: dict[str, Any] = {
            "model": self.model, "prompt": [prompt_ids + c for c in choice_ids],
            "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0,
        }
        if spec is not None:
            body["kn_steer"] = spec
        start = time.perf_counter()
        out = self._json("POST", "/v1/completions", body)
        latency = time.perf_counter() - start
        scores = []
        for choice, ids in zip(sorted(out["choices"], key=lambda c: c["index"]), choice_ids):
            token_logprobs = choice["logprobs"]["token_logprobs"]
            tail = token_logprobs[len(token_logprobs) - len(ids):]
            if len(tail) != len(ids) or any(v is None for v in tail):
                raise KnSteerError("server returned prompt log-probabilities that do not cover the choice")
            scores.append(float(sum(tail)))
        return scores, out.get("usage") or {}, str(out.get("id") or ""), latency


def _done_pairs(log_path: Path, experiment: str) -> set[tuple[str, str]]:
    """(arm, unit) pairs of this experiment that already have an outcome in the log."""
    if not log_path.exists():
        return set()
    assigned: dict[str, tuple[str, str]] = {}
    done: set[tuple[str, str]] = set()
    for _, rec in iter_records(log_path):
        if isinstance(rec, AssignmentRecord):
            if rec.experiment == experiment and rec.assignment == "offline" and rec.unit is not None:
                assigned[rec.request_id] = (rec.arm, rec.unit)
        elif rec.request_id in assigned:
            done.add(assigned[rec.request_id])
    return done


def run_offline(
    experiment: Experiment, items: Sequence[ChoiceItem], server: str, log_path: str | Path,
    concurrency: int = 4, model: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Score every (arm, item) not yet in the log; returns how many were run and skipped."""
    log = AssignmentLog(log_path)
    scorer = ServerScorer(server, model)
    done = _done_pairs(log.path, experiment.name)
    todo = [(arm, item) for arm in experiment.arms for item in items if (arm.name, item.id) not in done]
    control = experiment.control_arm
    token_cache: dict[str, list[int]] = {}

    def ids(text: str, special: bool) -> list[int]:
        key = f"{int(special)}:{text}"
        if key not in token_cache:
            token_cache[key] = scorer.tokenize(text, special)
        return token_cache[key]

    def one(pair: tuple[Arm, ChoiceItem]) -> None:
        arm, item = pair
        spec = None if arm.is_unsteered else arm.spec().model_dump(exclude_none=True, exclude={"experiment", "unit"})
        prompt_ids = ids(item.prompt, True)  # kn_steer.tokens: prompts with special tokens
        choice_ids = [ids(c, False) for c in item.choices]
        scores, usage, response_id, latency = scorer.score(prompt_ids, choice_ids, spec)
        best = max(range(len(scores)), key=lambda i: scores[i])
        request_id = f"offline-{response_id or uuid.uuid4().hex}"
        log.append(AssignmentRecord(
            request_id=request_id, experiment=experiment.name, arm=arm.name, unit=item.id,
            assignment="offline", is_control=arm.name == control, time=now_iso(), latency_s=latency,
            usage={"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens")},
            endpoint="completions", status=200, scores=scores, choice=best, faithful=item.faithful,
        ).model_dump(exclude_none=True))
        log.add_outcome(request_id, best == item.faithful, source="offline")

    finished = 0
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            for _ in pool.map(one, todo):
                finished += 1
                if progress is not None:
                    progress(finished, len(todo))
    return {"run": finished, "skipped": len(experiment.arms) * len(items) - len(todo)}
