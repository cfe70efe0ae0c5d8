"""Relation-specific neurons: neurons whose last-token activation singles out one relation.

Following the relation-specific neuron analysis of Liu et al. (2024), each MLP neuron is scored,
per relation ``r``, by the **average precision** of its activation at the last prompt token as a
detector of "this prompt asks for relation r" against prompts of the other relations. The top-N
neurons by AP form the set; deactivating them (clamp to 0) should hurt ``r``'s facts much more
than other relations' facts.

Everything is batched: one forward per batch of prompts collects the activations of all layers
at once (pre-hooks on the adapter's neuron modules), and AP is computed for every neuron at once
from one sort per neuron column.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kn_steer.errors import DataError, KnSteerError
from kn_steer.models.families import ModelShape
from kn_steer.models.sites import hook_site, remove_hooks
from kn_steer.tokens import continuation_ids, pad_id, prompt_ids

# ---------------------------------------------------------------------------------------------
# Batched scoring of prompts


def _batches(order: Sequence[int], size: int):
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


def _encode_left_padded(tokenizer: Any, prompts: Sequence[str], device: torch.device):
    """Left-padded ids, attention mask and position ids (so padding changes nothing)."""
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            raise KnSteerError(f"prompt {prompts[i]!r} tokenizes to nothing")
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), width


def first_target_token(tokenizer: Any, target: str) -> int:
    return int(continuation_ids(tokenizer, target)[0])


@dataclass
class PromptScores:
    """Per prompt: probability of the target's first token, its rank, and the argmax token."""

    prob: torch.Tensor  # [N] float
    rank: torch.Tensor  # [N] long, 0 = argmax
    argmax: torch.Tensor  # [N] long

    @property
    def correct(self) -> torch.Tensor:
        return self.rank == 0


@torch.no_grad()
def score_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    compiled: Any = None,
    batch_size: int = 64,
) -> PromptScores:
    """Next-token scores of each target's first token after each prompt, optionally steered.

    ``compiled`` is a :class:`kn_steer.spec.CompiledSteering` applied with the transformers
    reference intervention (:func:`kn_steer.reference.steer`).
    """
    from kn_steer.steering.reference import steer

    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    target_ids = torch.tensor([first_target_token(tokenizer, t) for t in targets], device=device)
    n = len(prompts)
    prob = torch.empty(n, device=device)
    rank = torch.empty(n, dtype=torch.long, device=device)
    argmax = torch.empty(n, dtype=torch.long, device=device)
    order = sorted(range(n), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    for idx in _batches(order, batch_size):
        ids, mask, pos, width = _encode_left_padded(tokenizer, [prompts[i] for i in idx], device)
        context = steer(model, compiled, width) if compiled is not None else _null()
        with context:
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            logits = out.logits[:, -1].float()
        sel = torch.tensor(idx, device=device)
        tgt = target_ids[sel]
        tgt_logit = logits.gather(1, tgt[:, None])
        prob[sel] = torch.softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
        rank[sel] = (logits > tgt_logit).sum(-1)
        argmax[sel] = logits.argmax(-1)
    return PromptScores(prob.cpu(), rank.cpu(), argmax.cpu())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Activations and average precision


@torch.no_grad()
def last_token_activations(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[N, layers * intermediate]: every neuron's activation at each prompt's last token.

    One forward per batch; pre-hooks on all layers' neuron modules copy the last position.
    """
    shape = ModelShape.from_config(model.config)
    device = next(model.parameters()).device
    out = torch.empty(len(prompts), shape.num_layers, shape.intermediate_size, dtype=dtype)
    current: dict[str, Any] = {}

    def record(layer: int, rows: torch.Tensor) -> None:
        acts = current["acts"]
        # canonical rows are batch-major: [B*T, I] -> [B, T, I]; left padding puts every prompt's
        # last token at the last position
        acts[:, layer] = rows.reshape(acts.shape[0], -1, rows.shape[-1])[:, -1].to(dtype).cpu()

    handles = hook_site(model, record)
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for idx in _batches(order, batch_size):
            ids, mask, pos, _ = _encode_left_padded(tokenizer, [prompts[i] for i in idx], device)
            current["acts"] = torch.empty(len(idx), shape.num_layers, shape.intermediate_size, dtype=dtype)
            # Only the layers are needed; the LM head on the last position is cheap anyway.
            model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
            out[torch.tensor(idx)] = current["acts"]
            if progress is not None:
                progress(len(idx))
    finally:
        remove_hooks(handles)
    return out.reshape(len(prompts), -1)


def average_precision(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """AP of every column of ``scores`` [N, K] as a detector of ``labels`` [N] (bool), [K].

    Same definition as scikit-learn's ``average_precision_score``: the sum over score thresholds
    of (recall step) x (precision at that threshold). Tied scores form one threshold, so each
    positive counts the precision at the end of its tie group. Columns are done ``chunk`` at a
    time to bound memory.
    """
    labels = labels.to(torch.bool).reshape(-1)
    return average_precision_multi(scores, labels[:, None], chunk)[0]


def average_precision_multi(scores: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """AP for several label columns at once, [R, K]: one sort of ``scores`` serves every ``labels``
    column [N, R] (the sort is the expensive part)."""
    labels = labels.to(torch.bool)
    n, k = scores.shape
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} rows, scores {n}")
    n_pos = labels.sum(0).to(torch.float64)  # [R]
    if bool((n_pos == 0).any()):
        raise ValueError("average precision needs at least one positive per label column")
    out = torch.empty(labels.shape[1], k, dtype=torch.float64)
    counts = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    for start in range(0, k, chunk):
        block = scores[:, start:start + chunk]
        sorted_scores, order = torch.sort(block, dim=0, descending=True, stable=True)
        # End of each tie group: the next row whose score differs (or the last row).
        is_end = torch.ones_like(sorted_scores, dtype=torch.bool)
        is_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
        rows = torch.arange(n)[:, None].expand_as(is_end)
        end_index = torch.where(is_end, rows, torch.full_like(rows, n))
        end_index = end_index.flip(0).cummin(0).values.flip(0)
        for r in range(labels.shape[1]):
            pos = labels[:, r][order].to(torch.float64)  # [N, C] labels in descending score order
            precision = (pos.cumsum(0) / counts).gather(0, end_index)
            out[r, start:start + chunk] = (precision * pos).sum(0) / n_pos[r]
    return out


def relation_ap(activations: torch.Tensor, labels: Sequence[str], relations: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per relation, the AP of every neuron (flat index layer * intermediate + index)."""
    matrix = torch.tensor([[lab == r for r in relations] for lab in labels])
    ap = average_precision_multi(activations, matrix)
    return {r: ap[j] for j, r in enumerate(relations)}


# ---------------------------------------------------------------------------------------------
# Neuron selection helpers


def top_neurons(ap: torch.Tensor, n: int, intermediate_size: int) -> list[tuple[int, int, float]]:
    """(layer, index, AP) of the ``n`` best neurons, best first."""
    values, flat = torch.topk(ap, min(n, ap.numel()))
    return [(int(f) // intermediate_size, int(f) % intermediate_size, float(v)) for v, f in zip(values, flat)]


def random_neurons(n: int, shape: ModelShape, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct neurons drawn uniformly over all layers and indices."""
    rng = random.Random(seed)
    total = shape.num_layers * shape.intermediate_size
    exclude = exclude or set()
    chosen: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    while len(chosen) < n:
        flat = rng.randrange(total)
        pair = (flat // shape.intermediate_size, flat % shape.intermediate_size)
        if pair not in seen and pair not in exclude:
            seen.add(pair)
            chosen.append(pair)
    return chosen


def deactivation(neurons: Sequence[tuple[int, int]], shape: ModelShape):
    """The compiled intervention that clamps ``neurons`` to 0 at every position."""
    from kn_steer.steering.compile import compile_spec

    spec = {"interventions": [{"neurons": [list(p) for p in neurons], "op": "clamp", "value": 0.0}]}
    return compile_spec(spec, {}, shape)


# ---------------------------------------------------------------------------------------------
# The corpus: labelled prompts of PARAREL relations, with a fixed train/test split of facts

#: Defaults of the corpus the ``relation`` method (and ``kn-steer localize``) localizes on.
FACTS_PER_RELATION = 20
PROMPTS_PER_FACT = 3


def fact_split(relation: str, fact_id: str) -> str:
    """``train`` or ``test``: a stable hash split (half and half), the same in every script."""
    digest = hashlib.sha256(f"{relation}:{fact_id}".encode("utf-8")).digest()
    return "train" if digest[0] % 2 == 0 else "test"


def _fact_order(relation: str, fact_id: str) -> bytes:
    return hashlib.sha256(f"order:{relation}:{fact_id}".encode("utf-8")).digest()


@dataclass(frozen=True)
class LabelledPrompt:
    relation: str
    prompt: str
    target: str
    fact: str  # fact key, so all prompts of one fact can be grouped


def relation_prompts(
    relations: Mapping[str, Any],
    split: str | None = "train",
    facts_per_relation: int | None = FACTS_PER_RELATION,
    prompts_per_fact: int | None = PROMPTS_PER_FACT,
) -> list[LabelledPrompt]:
    """Prompts of each relation's facts in ``split`` (None: all), in a stable hashed order.

    ``relations`` maps ids to :class:`kn_steer.data.pararel.Relation`. Fact ``k`` of a relation
    uses ``prompts_per_fact`` of its usable patterns starting at pattern ``k mod P``, so every
    pattern is represented even when a fact gets fewer prompts than there are patterns.
    """
    out: list[LabelledPrompt] = []
    for rid, rel in relations.items():
        prefixes = rel.prefixes
        if not prefixes:
            continue
        facts = [f for f in rel.facts if split is None or fact_split(rid, f.uuid or f.subject) == split]
        facts.sort(key=lambda f: _fact_order(rid, f.uuid or f.subject))
        if facts_per_relation is not None:
            facts = facts[:facts_per_relation]
        per_fact = len(prefixes) if prompts_per_fact is None else min(prompts_per_fact, len(prefixes))
        for k, fact in enumerate(facts):
            example = rel.prompts_for(fact)
            for j in range(per_fact):
                prompt = example.prompts[(k + j) % len(prefixes)]
                out.append(LabelledPrompt(rid, prompt, example.target, example.key))
    return out


# ---------------------------------------------------------------------------------------------
# The ``relation`` method in the localization registry


class RelationCorpus(BaseModel):
    """All labelled training prompts as ONE example: AP needs every relation's prompts at once."""

    model_config = ConfigDict(extra="forbid")

    id: str = "corpus"
    target: str  # a real target, so the runner's target check has something to tokenize
    prompts: list[str] = Field(min_length=1)
    relations: list[str]
    source: str = ""

    def key_text(self) -> str:
        return json.dumps(self.model_dump(exclude={"source"}), sort_keys=True, ensure_ascii=False)


def load_corpus(path: str | Path, limit: int | None = None) -> list[RelationCorpus]:
    """The training corpus of a PARAREL folder (every relation with a usable pattern)."""
    from kn_steer.data.pararel import load_pararel

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: the relation method reads a PARAREL folder (patterns/ and facts/)")
    items = relation_prompts(load_pararel(path))
    if not items:
        raise DataError(f"{path}: no usable PARAREL prompts")
    corpus = RelationCorpus(
        target=items[0].target, prompts=[i.prompt for i in items],
        relations=[i.relation for i in items], source=str(path),
    )
    return [corpus]


class RelationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    relation: str = Field(description="the relation whose neurons to find, e.g. P36")
    count: int = Field(100, ge=1, description="neurons in the set: the top N by average precision")
    keep: int = Field(2000, ge=1, description="neurons stored per run, so N up to this re-selects")
    value: float = Field(0.0, description="default operation: clamp to this value (deactivate)")
    batch_size: int = Field(32, ge=1)


def relation_score_corpus(ctx: Any, corpus: RelationCorpus, params: RelationParams) -> Any:
    from kn_steer.localize.methods import ExampleResult, ScoredNeuron

    if params.relation not in set(corpus.relations):
        known = ", ".join(sorted(set(corpus.relations)))
        raise KnSteerError(f"relation {params.relation!r} has no prompts in {corpus.source} (have: {known})")
    shape = ModelShape.from_config(ctx.model.config)
    acts = last_token_activations(ctx.model, ctx.tokenizer, corpus.prompts, params.batch_size)
    labels = torch.tensor([r == params.relation for r in corpus.relations])
    ap = average_precision(acts, labels)
    top = top_neurons(ap, max(params.keep, params.count), shape.intermediate_size)
    return ExampleResult(
        neurons=[ScoredNeuron(layer=l, index=i, score=s) for l, i, s in top],
        info={"prompts": len(corpus.prompts), "positives": int(labels.sum()),
              "relations": len(set(corpus.relations)), "prevalence": float(labels.float().mean())},
    )


def relation_select(results: list[Any], params: RelationParams) -> Any:
    from kn_steer.localize.methods import Selection
    from kn_steer.sets.format import Neuron, Operation

    (result,) = results
    chosen = result.neurons[: params.count]
    return Selection(
        neurons=[Neuron(layer=n.layer, index=n.index, score=n.score) for n in chosen],
        operation=Operation(op="clamp", value=params.value),
        metrics={"relation": params.relation, **result.info,
                 "ap_max": chosen[0].score if chosen else None,
                 "ap_min": chosen[-1].score if chosen else None},
    )


def _register() -> None:
    from kn_steer.localize.methods import MethodSpec, register_method

    class _CorpusMethod(MethodSpec):
        def load_examples(self, path: str | Path, limit: int | None = None) -> list[Any]:
            return load_corpus(path, limit)

    register_method(_CorpusMethod(
        name="relation", description="relation-specific neurons (average precision)",
        params_model=RelationParams, example_model=RelationCorpus,
        score_example=relation_score_corpus, select=relation_select,
        checkpoint_params=("relation", "keep", "batch_size"),
    ))


_register()
