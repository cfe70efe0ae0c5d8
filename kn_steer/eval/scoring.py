"""Multiple-choice scoring: the total log-probability of each continuation given the prompt.

Token ids are defined once for both backends (:mod:`kn_steer.tokens`): the prompt as the model
sees it at inference, followed by each continuation tokenized on its own (no special tokens). The transformers
backend packs one item per row, prompt and every continuation side by side, with a 4D
attention mask so each continuation sees the prompt and itself only and position ids that
restart after the prompt. The prompt is thus computed once per item, not once per choice;
the result equals scoring each ``prompt + continuation`` sequence separately (up to float
rounding), which is what the vLLM backend does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from kn_steer.data.common import ChoiceItem
from kn_steer.errors import DataError
from kn_steer.steering.masks import CompiledSteering
from kn_steer.tokens import continuation_ids, pad_id, prompt_ids


@dataclass(frozen=True)
class EncodedItem:
    """An item as token ids: the prompt and each continuation."""

    item: ChoiceItem
    prompt_ids: tuple[int, ...]
    choice_ids: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ItemScore:
    """Per-choice total log-probabilities of one item, and which choice wins."""

    id: str
    logprobs: tuple[float, ...]
    faithful: int
    trap: int | None

    @property
    def chosen(self) -> int:
        return max(range(len(self.logprobs)), key=lambda i: self.logprobs[i])

    @property
    def correct(self) -> bool:
        return self.chosen == self.faithful

    @property
    def trapped(self) -> bool:
        return self.trap is not None and self.chosen == self.trap

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "logprobs": list(self.logprobs), "chosen": self.chosen,
                "faithful": self.faithful, "trap": self.trap}


def encode_items(tokenizer: Any, items: Sequence[ChoiceItem]) -> list[EncodedItem]:
    """Token ids of every prompt and continuation; an empty tokenization is a DataError."""
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
        encoded.append(EncodedItem(item, prompt, tuple(choices)))
    return encoded


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, L + C]
    position_ids: torch.Tensor  # [B, L + C]
    mask: torch.Tensor  # [B, 1, L + C, L + C] additive float
    prompt_width: int  # L: every prompt ends at column L - 1 (left padding)
    segments: list[list[tuple[int, int]]]  # per row, per choice: [start, end) columns


def _pack(batch: Sequence[EncodedItem], pad_id: int, dtype: torch.dtype, device: Any) -> _Batch:
    """Left-pad prompts to a common end, then lay the choices side by side after it."""
    width = max(len(e.prompt_ids) for e in batch)
    tail = max(sum(len(c) for c in e.choice_ids) for e in batch)
    total = width + tail
    rows = len(batch)
    ids = torch.full((rows, total), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, total), dtype=torch.long)
    allow = torch.zeros((rows, total, total), dtype=torch.bool)
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    segments: list[list[tuple[int, int]]] = []
    for r, enc in enumerate(batch):
        p = len(enc.prompt_ids)
        start = width - p
        ids[r, start:width] = torch.tensor(enc.prompt_ids)
        pos[r, start:width] = torch.arange(p)
        allow[r, start:width, start:width] = causal[:p, :p]
        col = width
        row_segments = []
        for choice in enc.choice_ids:
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
def score_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[ChoiceItem] | Sequence[EncodedItem],
    compiled: CompiledSteering | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[ItemScore]:
    """Score every item with the transformers model, under ``compiled`` steering if given.

    The intervention applies at every position (the whole forward is the prompt).
    """
    from kn_steer.steering.reference import steer

    encoded = [e if isinstance(e, EncodedItem) else None for e in items]
    if any(e is None for e in encoded):
        encoded = encode_items(tokenizer, items)  # type: ignore[arg-type]
    param = next(model.parameters())
    pad = pad_id(tokenizer)
    # Similar lengths in one batch waste less padding; results go back in input order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids))
    results: dict[int, ItemScore] = {}
    keep_arg = _accepts_logits_to_keep(model)
    chunks = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), desc="scoring", unit="item")
    for chunk in chunks:
        batch = [encoded[i] for i in chunk]
        packed = _pack(batch, pad, param.dtype, param.device)
        total = packed.input_ids.shape[1]
        first = packed.prompt_width - 1  # logits needed from the last prompt column on
        kwargs: dict[str, Any] = {}
        if keep_arg:
            kwargs["logits_to_keep"] = torch.arange(first, total, device=param.device)
        with steer(model, compiled or _IDENTITY, prompt_length=total):
            out = model(input_ids=packed.input_ids, position_ids=packed.position_ids,
                        attention_mask=packed.mask, use_cache=False, **kwargs)
        logits = out.logits if keep_arg else out.logits[:, first:]
        logp = torch.log_softmax(logits.float(), dim=-1)  # column c -> index c - first
        for r, (idx, enc) in enumerate(zip(chunk, batch)):
            totals = []
            for (s, e), choice in zip(packed.segments[r], enc.choice_ids):
                # token at column s is predicted from the last prompt column, the rest from c - 1
                src = [first] + list(range(s, e - 1))
                rows = torch.tensor(src, device=param.device) - first
                tok = torch.tensor(choice, device=param.device)
                totals.append(float(logp[r, rows, tok].sum()))
            results[idx] = ItemScore(enc.item.id, tuple(totals), enc.item.faithful, enc.item.trap)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [results[i] for i in range(len(encoded))]


def _identity() -> CompiledSteering:
    from kn_steer.steering.masks import SparseMask

    return CompiledSteering(SparseMask.empty(), SparseMask.empty())


_IDENTITY = _identity()
