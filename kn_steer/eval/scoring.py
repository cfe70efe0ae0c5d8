"""Multiple-choice scoring under three rules, so a length preference cannot pass for an effect.

Per item and choice the model gives the total log-probability of the choice's tokens after the
prompt. Three rules pick the winning choice:

* ``total`` — the highest total log-probability. Every extra token costs probability, so this
  rule favours short choices.
* ``mean`` — length-normalized: total / number of tokens (mean log-probability per token).
* ``calibrated`` — domain-conditional PMI (Holtzman et al. 2021, "Surface form competition"):
  ``log P(choice | prompt) - log P(choice | neutral premise)``, where the neutral premise is the
  bare answer cue :data:`kn_steer.data.common.NEUTRAL_PROMPT` (``"Answer:"``), the same for every
  item. It removes what the model thinks of a choice without the question: its length and its
  prior frequency. Under steering both terms are computed under the same intervention (the PMI
  of the steered model).

Token ids follow :mod:`kn_steer.tokens` for both backends: the prompt as the model sees it at
inference, each continuation tokenized on its own. The transformers backend packs one prompt per
row with every continuation side by side, a 4D attention mask so each continuation sees the prompt
and itself only, and position ids that restart after the prompt: the prompt is computed once per
item, and the result equals scoring each ``prompt + continuation`` separately (up to float
rounding), which is what the vLLM backend does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.data.common import NEUTRAL_PROMPT, ChoiceItem
from kn_steer.errors import DataError, KnSteerError
from kn_steer.steering.masks import CompiledSteering, SparseMask
from kn_steer.steering.reference import steer
from kn_steer.tokens import continuation_ids, pad_id, prompt_ids

Rule = Literal["total", "mean", "calibrated"]
RULES: tuple[str, ...] = ("total", "mean", "calibrated")
LengthGroup = Literal["shorter", "equal", "longer"]
LENGTH_GROUPS: tuple[str, ...] = ("shorter", "equal", "longer")


@dataclass(frozen=True)
class EncodedItem:
    """An item as token ids: the prompt, the neutral premise and each continuation."""

    item: ChoiceItem
    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]
    neutral_ids: tuple[int, ...]


@dataclass(frozen=True)
class ItemScore:
    """Per-choice log-probabilities of one item (total, and after the neutral premise) and
    which choice each rule picks."""

    id: str
    logprobs: tuple[float, ...]  # total log P(choice | prompt)
    faithful: int
    trap: int | None
    lengths: tuple[int, ...]  # tokens per choice
    neutral: tuple[float, ...] | None = None  # total log P(choice | neutral premise)

    def scores(self, rule: str = "total") -> tuple[float, ...]:
        if rule == "total":
            return self.logprobs
        if rule == "mean":
            return tuple(lp / n for lp, n in zip(self.logprobs, self.lengths))
        if rule == "calibrated":
            if self.neutral is None:
                raise KnSteerError(f"item {self.id}: scored without the neutral premise (calibrate=False)")
            return tuple(lp - base for lp, base in zip(self.logprobs, self.neutral))
        raise KnSteerError(f"unknown scoring rule {rule!r}; known: {', '.join(RULES)}")

    def chosen_by(self, rule: str = "total") -> int:
        scores = self.scores(rule)
        return max(range(len(scores)), key=lambda i: scores[i])

    def correct_by(self, rule: str = "total") -> bool:
        return self.chosen_by(rule) == self.faithful

    def trapped_by(self, rule: str = "total") -> bool:
        return self.trap is not None and self.chosen_by(rule) == self.trap

    @property
    def chosen(self) -> int:
        return self.chosen_by("total")

    @property
    def correct(self) -> bool:
        return self.correct_by("total")

    @property
    def trapped(self) -> bool:
        return self.trapped_by("total")

    @property
    def length_group(self) -> LengthGroup:
        """Is the correct (faithful) choice shorter, in tokens, than its rival? The rival is the
        trap when the item has one, else the shortest other choice."""
        rival = self.trap if self.trap is not None else min(
            (i for i in range(len(self.lengths)) if i != self.faithful), key=lambda i: self.lengths[i])
        mine, theirs = self.lengths[self.faithful], self.lengths[rival]
        return "shorter" if mine < theirs else "longer" if mine > theirs else "equal"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "logprobs": list(self.logprobs), "lengths": list(self.lengths),
                               "neutral": None if self.neutral is None else list(self.neutral),
                               "faithful": self.faithful, "trap": self.trap, "length_group": self.length_group}
        rules = RULES if self.neutral is not None else RULES[:2]
        out["chosen"] = {r: self.chosen_by(r) for r in rules}
        out["correct"] = {r: self.correct_by(r) for r in rules}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ItemScore":
        neutral = data.get("neutral")
        return cls(data["id"], tuple(data["logprobs"]), data["faithful"], data["trap"], tuple(data["lengths"]),
                   None if neutral is None else tuple(neutral))


def encode_items(tokenizer: Any, items: Sequence[ChoiceItem]) -> list[EncodedItem]:
    """Token ids of every prompt, the neutral premise and every continuation."""
    neutral = tuple(prompt_ids(tokenizer, NEUTRAL_PROMPT))
    encoded = []
    for item in items:
        try:
            prompt = tuple(prompt_ids(tokenizer, item.prompt))
        except DataError as exc:
            raise DataError(f"{item.id}: {exc}") from None
        choices = []
        for k, text in enumerate(item.choices):
            try:
                choices.append(tuple(continuation_ids(tokenizer, text)))
            except DataError:
                raise DataError(f"{item.id}: choice {k} ({text!r}) tokenizes to nothing") from None
        encoded.append(EncodedItem(item, prompt, tuple(choices), neutral))
    return encoded


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L + C]
    position_ids: torch.Tensor  # [B, L + C]
    mask: torch.Tensor  # [B, 1, L + C, L + C] additive float
    prompt_width: int  # L: every prompt ends at column L - 1 (left padding)
    segments: list[list[tuple[int, int]]]  # per row, per choice: [start, end) columns


_Row = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # (prompt ids, choice ids)


def _pack(batch: Sequence[_Row], pad_id: int, dtype: torch.dtype, device: Any) -> _Batch:
    """Left-pad prompts to a common end, then lay the choices side by side after it."""
    width = max(len(prompt) for prompt, _ in batch)
    tail = max(sum(len(c) for c in choices) for _, choices in batch)
    total = width + tail
    rows = len(batch)
    ids = torch.full((rows, total), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, total), dtype=torch.long)
    allow = torch.zeros((rows, total, total), dtype=torch.bool)
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    segments: list[list[tuple[int, int]]] = []
    for r, (prompt, choices) in enumerate(batch):
        p = len(prompt)
        start = width - p
        ids[r, start:width] = torch.tensor(prompt)
        pos[r, start:width] = torch.arange(p)
        allow[r, start:width, start:width] = causal[:p, :p]
        col = width
        row_segments = []
        for choice in choices:
            n = len(choice)
            ids[r, col:col + n] = torch.tensor(choice)
            pos[r, col:col + n] = torch.arange(p, p + n)
            allow[r, col:col + n, start:width] = True
            allow[r, col:col + n, col:col + n] = causal[:n, :n]
            row_segments.append((col, col + n))
            col += n
        segments.append(row_segments)
        idle = torch.ones(total, dtype=torch.bool)
        idle[start:col] = False
        pads = idle.nonzero().squeeze(1)
        allow[r, pads, pads] = True  # padding attends to itself only: no empty softmax rows
    mask = torch.zeros((rows, 1, total, total), dtype=dtype)
    mask.masked_fill_(~allow[:, None], torch.finfo(dtype).min)
    return _Batch(ids.to(device), pos.to(device), mask.to(device), width, segments)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def _score_rows(model: torch.nn.Module, pad: int, rows: Sequence[_Row], compiled: CompiledSteering,
                batch_size: int, bar: Any) -> list[tuple[float, ...]]:
    """Total log-probability of every choice of every row, in input order."""
    param = next(model.parameters())
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # less padding per batch
    results: dict[int, tuple[float, ...]] = {}
    keep_arg = _accepts_logits_to_keep(model)
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        batch = [rows[i] for i in chunk]
        packed = _pack(batch, pad, param.dtype, param.device)
        total = packed.input_ids.shape[1]
        first = packed.prompt_width - 1  # every choice's first token is predicted from here
        # a choice token at column s is predicted from the last prompt column, the rest from c - 1:
        # only those columns go through the LM head (single-token choices need the first alone)
        sources = [[[first] + list(range(s, e - 1)) for s, e in segments] for segments in packed.segments]
        needed = sorted({c for row in sources for cols in row for c in cols})
        where = {c: k for k, c in enumerate(needed)}
        columns = torch.tensor(needed, device=param.device)
        kwargs: dict[str, Any] = {"logits_to_keep": columns} if keep_arg else {}
        with steer(model, compiled, prompt_length=total):
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        attention_mask=packed.mask, use_cache=False, **kwargs)
        logits = out.logits if keep_arg else out.logits[:, columns]
        logp = torch.log_softmax(logits.float(), dim=-1)  # column c -> index where[c]
        for r, (idx, (_, choices)) in enumerate(zip(chunk, batch)):
            totals = []
            for cols, choice in zip(sources[r], choices):
                src = torch.tensor([where[c] for c in cols], device=param.device)
                totals.append(float(logp[r, src, torch.tensor(choice, device=param.device)].sum()))
            results[idx] = tuple(totals)
        if bar is not None:
            bar.update(len(chunk))
    return [results[i] for i in range(len(rows))]


def score_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[ChoiceItem] | Sequence[EncodedItem],
    compiled: CompiledSteering | None = None,
    batch_size: int = 16,
    progress: bool = False,
    calibrate: bool = True,
) -> list[ItemScore]:
    """Score every item with the transformers model, under ``compiled`` steering if given (at
    every position). ``calibrate``: also score each choice after the neutral premise."""
    encoded = [e if isinstance(e, EncodedItem) else None for e in items]
    if any(e is None for e in encoded):
        encoded = encode_items(tokenizer, items)  # type: ignore[arg-type]
    rows: list[_Row] = [(e.prompt_ids, e.choice_ids) for e in encoded]
    if calibrate:
        rows += [(e.neutral_ids, e.choice_ids) for e in encoded]
    bar = tqdm(total=len(rows), desc="scoring", unit="row") if progress else None
    totals = _score_rows(model, pad_id(tokenizer), rows, compiled or _IDENTITY, batch_size, bar)
    if bar is not None:
        bar.close()
    n = len(encoded)
    return [ItemScore(e.item.id, totals[k], e.item.faithful, e.item.trap, tuple(len(c) for c in e.choice_ids),
                      totals[n + k] if calibrate else None)
            for k, e in enumerate(encoded)]


_IDENTITY = CompiledSteering(SparseMask.empty(), SparseMask.empty())
