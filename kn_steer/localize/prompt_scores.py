"""Next-token scoring of prompts: does the model put a target's first token first?

For fact prompts (PARAREL, knowledge and relation neurons): per prompt, the probability of the
target's first token, its rank among all tokens and the argmax, optionally under a steering
intervention (the transformers reference, :func:`kn_steer.steering.reference.steer`). Prompts are
tokenized and left-padded as the recorder does (:func:`kn_steer.localize.recorder.left_padded`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from kn_steer.localize.recorder import last_logits_only, left_padded, length_batches
from kn_steer.steering.masks import CompiledSteering
from kn_steer.steering.reference import steer
from kn_steer.tokens import continuation_ids


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
    compiled: CompiledSteering | None = None,
    batch_size: int = 64,
) -> PromptScores:
    """Next-token scores of each target's first token after each prompt, optionally steered."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = next(model.parameters()).device
    target_ids = torch.tensor([continuation_ids(tokenizer, t)[0] for t in targets], device=device)
    n = len(prompts)
    prob = torch.empty(n, device=device)
    rank = torch.empty(n, dtype=torch.long, device=device)
    argmax = torch.empty(n, dtype=torch.long, device=device)
    for idx in length_batches(prompts, batch_size):
        batch = left_padded(tokenizer, [prompts[i] for i in idx], device)
        context = steer(model, compiled, batch.width) if compiled is not None else contextlib.nullcontext()
        with context:
            logits = model(**batch.model_inputs(), **last_logits_only(model)).logits[:, -1].float()
        sel = torch.tensor(idx, device=device)
        tgt = target_ids[sel]
        tgt_logit = logits.gather(1, tgt[:, None])
        prob[sel] = torch.softmax(logits, -1).gather(1, tgt[:, None])[:, 0]
        rank[sel] = (logits > tgt_logit).sum(-1)
        argmax[sel] = logits.argmax(-1)
    return PromptScores(prob.cpu(), rank.cpu(), argmax.cpu())
