"""Per-text negative log-likelihood (and next-token entropy), optionally under steering: what a set
does to plain language.

Each text is tokenized as at inference (special tokens included, so Gemma gets its ``<bos>``),
cut to its first ``max_tokens`` tokens, and every token after the first is predicted from the ones
before it. Texts are batched by length and left-padded with position ids that skip the padding
(the padding changes nothing); the steering applies at every position, all of which are prompt
positions. The result per text is (summed NLL, predicted tokens), so perplexity pools tokens and a
paired test can compare texts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from kn_steer.localize.recorder import left_padded_ids
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.reference import steer
from kn_steer.tokens import pad_id, prompt_ids


@torch.no_grad()
def text_token_stats(model: nn.Module, tokenizer: Any, texts: Sequence[str], compiled: CompiledSteering | None = None,
                     max_tokens: int = 64, batch_size: int = 8) -> list[tuple[float, float, int]]:
    """(summed NLL in nats, summed entropy of the next-token distribution in nats, predicted
    tokens) per text."""
    if max_tokens < 2:
        raise ValueError("max_tokens must be at least 2 (one token to predict)")
    rows = [prompt_ids(tokenizer, t)[:max_tokens] for t in texts]
    device = next(model.parameters()).device
    out: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = left_padded_ids([rows[i] for i in idx], pad_id(tokenizer), device)
        context = steer(model, compiled, batch.width) if compiled is not None else contextlib.nullcontext()
        with context:
            logits = model(**batch.model_inputs()).logits
        targets = batch.input_ids[:, 1:]
        valid = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).bool()
        for j, i in enumerate(idx):  # one row at a time: a 262k vocabulary makes the batch's log-softmax large
            logp = torch.log_softmax(logits[j, :-1].float(), -1)
            nll = -logp.gather(1, targets[j, :, None])[:, 0]
            entropy = -(logp.exp() * logp).sum(-1)
            out[i] = (float(nll[valid[j]].sum()), float(entropy[valid[j]].sum()), int(valid[j].sum()))
    return out


def text_nll(model: nn.Module, tokenizer: Any, texts: Sequence[str], compiled: CompiledSteering | None = None,
             max_tokens: int = 64, batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed NLL in nats, predicted tokens) per text."""
    return [(nll, n) for nll, _, n in text_token_stats(model, tokenizer, texts, compiled, max_tokens, batch_size)]


def perplexity(values: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens) over texts."""
    tokens = sum(n for _, n in values)
    return float(torch.tensor(sum(v for v, _ in values) / max(tokens, 1)).exp())
