"""``diff-means``: a residual-stream direction as the difference of two prompt sets' means.

Arditi et al. (2024) find refusal as one direction: the mean residual stream over harmful
instructions minus the mean over harmless ones, at the last token of the prompt; removing it from
every layer's stream stops an instruct model from refusing, adding it makes the model refuse
harmless requests. "How post-training reshapes LLMs" finds truthfulness the same way (true vs false
statements) and reports that it transfers from a base model to its post-trained version.

Per layer ``l`` (the stream after it, ``resid.post``): ``r_l = mean(positive) - mean(negative)`` over
the ``train`` first items of each class. The layer is chosen on the next ``select`` items of each
class, never the ``val`` files: the one among the candidate layers (``min_depth``..``max_depth`` of
the depth; Arditi et al. also leave out the last layers) whose direction separates the held-out
items best (Cohen's d of their projections on the unit ``r_l``). A fixed ``layer`` skips the choice.

The set holds directions (format version 2): for ``ablate``, the chosen ``r_l`` at every layer (the
paper removes it from every layer's stream); for ``add``, ``r_l`` at the chosen layer with alpha 1
(adding the mean difference itself).

Formats: ``refusal`` (a folder with harmful_/harmless_ ``train`` files), ``truthfulqa`` (the CSV:
question with its best answer vs with an incorrect answer), ``jsonl`` (``{"text", "label"}``, label
1 positive, 0 negative). ``chat`` renders each text as a user turn of the model's chat template,
when it has one (what the chat endpoint serves).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from kn_steer.data.contrast import Contrast, load_refusal, load_truthfulqa
from kn_steer.errors import DataError, KnSteerError
from kn_steer.fileio import read_jsonl
from kn_steer.localize.methods.base import Context, CorpusMethod, CorpusStats, Selection
from kn_steer.localize.recorder import last_token_streams
from kn_steer.sets.format import Direction, Operation
from kn_steer.tokens import chat_prompt


class ContrastCorpus(BaseModel):
    """The texts of both classes: ``train`` items for the means, then ``select`` items for the layer."""

    model_config = ConfigDict(extra="forbid")
    positive: list[str] = Field(min_length=1)
    negative: list[str] = Field(min_length=1)
    select_positive: list[str] = Field(default_factory=list)
    select_negative: list[str] = Field(default_factory=list)
    source: str = ""

    @property
    def prompts(self) -> list[str]:
        return self.positive + self.negative + self.select_positive + self.select_negative


class DiffMeansParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: int = Field(128, ge=1, description="items per class whose means give the direction")
    select: int = Field(32, ge=0, description="the next items per class, to choose the layer (0: give --layer)")
    layer: int | None = Field(None, ge=0, description="use this layer's direction instead of choosing one")
    min_depth: float = Field(0.2, ge=0, le=1, description="candidate layers from this fraction of the depth")
    max_depth: float = Field(0.8, ge=0, le=1, description="... up to this fraction")
    op: Literal["ablate", "add"] = Field("ablate", description="default operation of the set")
    chat: bool = Field(True, description="render texts as a user turn of the model's chat template, if any")
    batch_size: int = Field(16, ge=1, description="prompts per forward")


def _read_jsonl(path: Path) -> Contrast:
    positive, negative = [], []
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get("text"), str) or obj.get("label") not in (0, 1):
            raise DataError(f"{path}:{n}: expected {{\"text\": str, \"label\": 0 or 1}}")
        (positive if obj["label"] == 1 else negative).append(obj["text"])
    return Contrast(positive, negative)


def load_corpus(path: Path, format: str, params: DiffMeansParams, limit: int | None = None) -> ContrastCorpus:
    if limit is not None:
        raise KnSteerError("--limit does not apply to the diff-means method; use --train and --select")
    if format == "refusal":
        data = load_refusal(path, "train")
    elif format == "truthfulqa":
        data = load_truthfulqa(path)
    else:
        data = _read_jsonl(path)
    need = params.train + params.select
    for name, texts in (("positive", data.positive), ("negative", data.negative)):
        if len(texts) < need:
            raise KnSteerError(f"{path}: {len(texts)} {name} items, fewer than --train {params.train} + "
                               f"--select {params.select}")
    if params.select == 0 and params.layer is None:
        raise KnSteerError("--select 0 leaves nothing to choose the layer on: give --layer")
    means, chooser = data.take(0, params.train), data.take(params.train, params.select)
    return ContrastCorpus(positive=means.positive, negative=means.negative, select_positive=chooser.positive,
                          select_negative=chooser.negative, source=str(path))


def separation(streams_pos: torch.Tensor, streams_neg: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Per layer, Cohen's d of the two classes' projections on the unit direction (``[N, layers, hidden]``
    streams, ``[layers, hidden]`` directions)."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a = (streams_pos * unit).sum(-1)
    b = (streams_neg * unit).sum(-1)
    pooled = ((a.var(0, unbiased=True) + b.var(0, unbiased=True)) / 2).sqrt().clamp_min(1e-12)
    return (a.mean(0) - b.mean(0)) / pooled


def accumulate(ctx: Context, corpus: ContrastCorpus, params: DiffMeansParams) -> CorpusStats:
    texts = [chat_prompt(ctx.tokenizer, t, params.chat) for t in corpus.prompts]
    bar = tqdm(total=len(texts), desc="diff-means streams", unit="prompt", disable=not ctx.progress)
    try:
        streams = last_token_streams(ctx.model, ctx.tokenizer, texts, params.batch_size, progress=bar.update)
    finally:
        bar.close()
    n_pos, n_neg, n_sel = len(corpus.positive), len(corpus.negative), len(corpus.select_positive)
    pos, neg = streams[:n_pos], streams[n_pos:n_pos + n_neg]
    directions = pos.mean(0) - neg.mean(0)  # [layers, hidden]
    info = {"norms": directions.norm(dim=-1).tolist(), "train": [n_pos, n_neg]}
    if n_sel:
        sel = streams[n_pos + n_neg:]
        info["separation"] = separation(sel[:n_sel], sel[n_sel:], directions).tolist()
        info["select"] = [n_sel, len(corpus.select_negative)]
    return CorpusStats(scores=directions, info=info)


def choose_layer(stats: CorpusStats, params: DiffMeansParams) -> int:
    layers = stats.scores.shape[0]
    if params.layer is not None:
        if params.layer >= layers:
            raise KnSteerError(f"--layer {params.layer}: the model has {layers} layers")
        return params.layer
    low, high = math.floor(params.min_depth * (layers - 1)), math.ceil(params.max_depth * (layers - 1))
    if low > high:
        raise KnSteerError(f"--min-depth {params.min_depth} is above --max-depth {params.max_depth}")
    sep = stats.info["separation"]
    return max(range(low, high + 1), key=lambda l: sep[l])


def select(stats: CorpusStats, params: DiffMeansParams) -> Selection:
    layer = choose_layer(stats, params)
    vector = stats.scores[layer].tolist()
    sep = stats.info.get("separation")
    score = sep[layer] if sep is not None else None
    label = f"diff of means at layer {layer}"
    if params.op == "ablate":
        directions = [Direction(layer=l, vector=vector, score=score, label=label) for l in range(stats.scores.shape[0])]
        operation = Operation(op="ablate")
    else:
        directions = [Direction(layer=layer, vector=vector, score=score, label=label)]
        operation = Operation(op="add", alpha=1.0)
    metrics = {"chosen_layer": layer, "norm": stats.info["norms"][layer], "norms": stats.info["norms"],
               "separation": sep, "train": stats.info["train"], "select": stats.info.get("select")}
    return Selection(neurons=[], operation=operation, metrics=metrics, directions=directions)


DIFF_MEANS = CorpusMethod(
    name="diff-means",
    description="a residual-stream direction: difference of two prompt sets' mean streams (Arditi et al.)",
    params_model=DiffMeansParams,
    corpus_model=ContrastCorpus,
    load_corpus=load_corpus,
    accumulate=accumulate,
    select=select,
    formats=("refusal", "truthfulqa", "jsonl"),
)
