"""The serving-path backend: vLLM with the kn-steer plugin, scored from prompt log-probabilities.

Each ``prompt + continuation`` is sent as token ids (the same ids the transformers backend
uses) with ``prompt_logprobs=0``, so vLLM returns the log-probability of every prompt token;
the continuation's total is the sum over its tokens. The intervention travels in
``SamplingParams.extra_args["kn_steer"]`` exactly as an API request would carry it, and
applies to every position because every scored token is a prompt token.

Creating ``vllm.LLM`` spawns processes: scripts using this module need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from transformers import AutoConfig

from kn_steer.data import ChoiceItem
from kn_steer.errors import KnSteerError
from kn_steer.eval.scoring import EncodedItem, ItemScore, encode_items
from kn_steer.models import resolve_model
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import model_identity
from kn_steer.serving.settings import environment
from kn_steer.sets.registry import ENV_VAR, NeuronSetRegistry
from kn_steer.steering.spec import SteeringSpec


class VLLMEvaluator:
    """One vLLM engine (float32, plugin loaded) that scores item lists under any spec."""

    def __init__(self, model: str | Path = "smollm2-135m", sets_dir: str | Path | None = None,
                 llm: Any | None = None, **llm_kwargs: Any):
        """Start an engine on ``model``, or wrap ``llm`` (an engine already serving ``model``)."""
        try:
            import vllm
        except ImportError as exc:
            raise KnSteerError("the vllm backend needs vLLM: pip install 'kn-steer[cpu]' (or [gpu])") from exc

        self.ref = resolve_model(model)
        self.sets_dir = sets_dir
        config = AutoConfig.from_pretrained(self.ref.path)
        self.shape = ModelShape.from_config(config)
        self.identity = model_identity(self.ref, config)
        if llm is not None:
            self.llm = llm
            self.tokenizer = llm.get_tokenizer()
            return
        kwargs: dict[str, Any] = dict(model=str(self.ref.path), dtype="float32", max_model_len=2048,
                                      enable_prefix_caching=True, seed=0)
        kwargs.update(llm_kwargs)
        env = {} if sets_dir is None else {ENV_VAR: str(Path(sets_dir).resolve())}  # read once, while built
        with environment(env):
            self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    @property
    def sets(self) -> Mapping[str, Any]:
        """The sets the plugin serves (the same folder), for random controls copying a set's dose."""
        return NeuronSetRegistry.load(self.sets_dir, self.identity)

    def score(self, items: Sequence[ChoiceItem] | Sequence[EncodedItem],
              spec: SteeringSpec | Mapping[str, Any] | None = None, calibrate: bool = True) -> list[ItemScore]:
        """Scores as :func:`kn_steer.eval.scoring.score_hf` computes them, through the server path."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        encoded = [e for e in items if isinstance(e, EncodedItem)]
        if len(encoded) != len(items):
            encoded = encode_items(self.tokenizer, items)  # type: ignore[arg-type]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=_extra(spec))
        rows, where = choice_rows(encoded, calibrate)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        logprobs = [[0.0] + [out.prompt_logprobs[pos][tok].logprob for pos, tok in enumerate(out.prompt_token_ids) if pos]
                    for out in outputs]  # the first token has no log-probability
        return item_scores(encoded, where, logprobs, calibrate)


def _extra(spec: SteeringSpec | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    return {"kn_steer": json.loads(spec.model_dump_json(exclude_none=True)) if isinstance(spec, SteeringSpec) else dict(spec)}


def generate(llm: Any, tokenizer: Any, prompts: Sequence[str], specs: Sequence[Any], max_tokens: int,
             stop: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (tokenized as :func:`kn_steer.tokens.prompt_ids`), each
    under its own spec (None: unsteered), all in one batch: requests with different interventions
    run side by side, as on a server."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kn_steer.tokens import prompt_ids

    params = [SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop or []) or None,
                             extra_args=_extra(spec)) for spec in specs]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tokenizer, p)) for p in prompts], params,
                           use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def continuation_logprobs(llm: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str],
                          specs: Sequence[Any]) -> list[float]:
    """Total log-probability of each continuation's tokens after its prompt, each under its own spec."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kn_steer.tokens import continuation_ids, prompt_ids

    rows, starts = [], []
    for prompt, cont in zip(prompts, continuations):
        head = prompt_ids(tokenizer, prompt)
        rows.append(head + continuation_ids(tokenizer, cont))
        starts.append(len(head))
    params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, extra_args=_extra(spec)) for spec in specs]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
    return [float(sum(out.prompt_logprobs[pos][tok].logprob for pos, tok in enumerate(row) if pos >= start))
            for out, row, start in zip(outputs, rows, starts)]


def choice_rows(encoded: Sequence[EncodedItem], calibrate: bool) -> tuple[list[list[int]], list[tuple[int, int, int, int]]]:
    """Every ``head + choice`` token row to score (head: the prompt, and the neutral prompt when
    calibrating), with (item, head, choice, choice start) for each."""
    rows, where = [], []
    for k, enc in enumerate(encoded):
        heads = [enc.prompt_ids] + ([enc.neutral_ids] if calibrate else [])
        for h, head in enumerate(heads):
            for c, choice in enumerate(enc.choice_ids):
                rows.append(list(head) + list(choice))
                where.append((k, h, c, len(head)))
    return rows, where


def item_scores(encoded: Sequence[EncodedItem], where: Sequence[tuple[int, int, int, int]],
                logprobs: Sequence[Sequence[float]], calibrate: bool) -> list[ItemScore]:
    """Item scores from each row's per-token log-probabilities (``logprobs[r][pos]``: of token
    ``pos`` given the ones before), summed over the choice's tokens."""
    totals = [[[0.0] * len(e.choice_ids) for _ in range(2)] for e in encoded]
    for (k, h, c, start), row in zip(where, logprobs):
        totals[k][h][c] = float(sum(row[start:]))
    return [ItemScore(e.item.id, tuple(t[0]), e.item.faithful, e.item.trap,
                      tuple(len(c) for c in e.choice_ids), tuple(t[1]) if calibrate else None)
            for e, t in zip(encoded, totals)]
