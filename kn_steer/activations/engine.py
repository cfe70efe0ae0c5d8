"""Corpus statistics and activations through vLLM, with the kn-steer plugin's read op.

:class:`ActivationEngine` builds one offline ``vllm.LLM`` that keeps live statistics of every
neuron (``KN_STEER_WATCH=all``) and can read every neuron back (the limit raised to one whole
model per request):

* :meth:`ActivationEngine.token_stats` counts every token of every text, per group, inside the
  workers (no values leave the engine until the end): each text is one request with
  ``max_tokens=1`` (only its prompt passes through the model) and an engine-side group of its own
  run (``run/group``), so earlier runs and live traffic never mix in. Prefix caching is off: a
  token served from the cache would not be computed, hence not counted. A corpus that counts its
  tokens apart (per position or token id) labels each prompt token with its group instead
  (``TOKEN_GROUPS_KEY``); the engine must keep that many groups (``groups``).
* :meth:`ActivationEngine.last_token_activations` reads every neuron at each text's last token
  (read-back, ``positions: last``): the ``[texts, layers * units]`` matrix the relation method
  ranks, laid out as :func:`kn_steer.localize.recorder.last_token_activations` lays it out.

Values are those the output projection receives, in the engine's dtype (float32 by default), as
transformers computes them up to kernel rounding (checked by the integration tests).

Creating ``vllm.LLM`` spawns processes: scripts using this module need an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from transformers import AutoConfig

from kn_steer.activations.corpus import TokenCorpus
from kn_steer.errors import KnSteerError
from kn_steer.models import resolve_model
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import model_identity
from kn_steer.serving import stats as live
from kn_steer.serving.readback import read_back
from kn_steer.serving.settings import environment
from kn_steer.serving.wire import GROUP_KEY, TOKEN_GROUPS_KEY

CHUNK = 256  # requests handed to the engine at once (progress and memory per call)
#: vLLM CPU settings unless the caller's environment has its own (as ``kn-steer serve``): a small
#: KV cache (vLLM would reserve most of the machine's memory) and no AOT compile artifacts.
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_USE_AOT_COMPILE": "0"}


class ActivationEngine:
    """One vLLM engine counting and reading every neuron (see the module docstring)."""

    def __init__(self, model: str | Path = "smollm2-135m", threshold: float = 0.0, max_model_len: int = 2048,
                 sets_dir: str | Path | None = None, groups: int = 64, **llm_kwargs: Any):
        """``groups``: statistics groups the workers keep (memory: ``groups x neurons x 20``
        bytes); each run takes as many as it counts, labels are never reused."""
        try:
            import vllm
        except ImportError as exc:
            raise KnSteerError("the vllm backend needs vLLM: pip install 'kn-steer[cpu]' (or [gpu])") from exc
        self.ref = resolve_model(model)
        config = AutoConfig.from_pretrained(self.ref.path)
        self.shape = ModelShape.from_config(config)
        self.identity = model_identity(self.ref, config)
        self.threshold = float(threshold)
        env = {k: v for k, v in CPU_DEFAULTS.items() if k not in os.environ}
        env |= {"KN_STEER_WATCH": "all", "KN_STEER_WATCH_THRESHOLD": repr(self.threshold),
               "KN_STEER_READ_BACK": "1", "KN_STEER_MAX_READ_VALUES": str(self.shape.num_neurons),
               "KN_STEER_WATCH_GROUPS": str(int(groups))}
        if sets_dir is not None:
            env["KN_STEER_NEURON_SETS"] = str(Path(sets_dir).resolve())
        kwargs: dict[str, Any] = dict(model=str(self.ref.path), dtype="float32", max_model_len=max_model_len, seed=0)
        kwargs.update(llm_kwargs)
        kwargs["enable_prefix_caching"] = False  # every token is computed, so every token is counted
        with environment(env):
            self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(max_model_len)

    def _check_rows(self, rows: Sequence[Sequence[int]]) -> None:
        for i, row in enumerate(rows):
            if not row:
                raise KnSteerError(f"text {i} has no tokens")
            if len(row) >= self.max_model_len:
                raise KnSteerError(f"text {i} has {len(row)} tokens; this engine takes fewer than {self.max_model_len} "
                                   "(cut texts with --max-tokens)")

    def _generate(self, rows: Sequence[Sequence[int]], extras: Sequence[dict[str, Any]],
                  progress: Callable[[int], None] | None) -> list[Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outputs: list[Any] = []
        for start in range(0, len(rows), CHUNK):
            part = range(start, min(start + CHUNK, len(rows)))
            params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args=extras[i]) for i in part]
            outputs += self.llm.generate([TokensPrompt(prompt_token_ids=list(rows[i])) for i in part], params,
                                         use_tqdm=False)
            if progress is not None:
                progress(len(part))
        return outputs

    def token_stats(self, corpus: TokenCorpus, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """``fires``, ``sums``, ``maxes`` as ``[groups, layers, units]`` over every token of ``corpus``."""
        self._check_rows(corpus.rows)
        run = uuid.uuid4().hex[:12]
        labels = [f"{run}/{g}" for g in corpus.groups]
        if corpus.token_groups is None:
            extras = [{"kn_steer": {}, GROUP_KEY: labels[g]} for g in corpus.group_of]
        else:
            extras = [_token_labels(labels, groups) for groups in corpus.token_groups]
        self._generate(corpus.rows, extras, progress)
        found = live.tables(self.llm.collective_rpc(live.STATS_METHOD))
        if found is None:
            raise KnSteerError("the engine keeps no neuron statistics (was it built by ActivationEngine?)")
        groups, tokens, ids, table = found
        missing = [g for g, label in zip(corpus.groups, labels) if label not in groups]
        if missing:
            raise KnSteerError(f"the engine ran out of statistics groups before {', '.join(missing)}; "
                               "count fewer groups at once or start a new engine")
        if ids.size != self.shape.num_neurons:
            raise KnSteerError(f"the engine watched {ids.size} neurons, not all {self.shape.num_neurons}")
        rows = [groups.index(label) for label in labels]
        expected, _ = corpus.counts("all")
        counted = tokens[rows].tolist()
        if counted != expected:
            raise KnSteerError(f"the engine counted {counted} tokens per group, the corpus has {expected}")
        size = (len(rows), self.shape.num_layers, self.shape.intermediate_size)
        return {"fires": table["fires"][rows].reshape(size), "sums": table["sums"][rows].reshape(size),
                "maxes": table["maxes"][rows].reshape(size).astype(np.float32)}

    def last_token_activations(self, rows: Sequence[Sequence[int]],
                               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """``[texts, layers * units]``: every neuron's value at each row's last token."""
        self._check_rows(rows)
        spec = {"read": {"layers": list(range(self.shape.num_layers)), "positions": "last"}}
        out = np.empty((len(rows), self.shape.num_neurons), dtype=np.float32)
        for start in range(0, len(rows), CHUNK):
            part = list(rows[start:start + CHUNK])
            outputs = self._generate(part, [{"kn_steer": spec}] * len(part), None)
            for k, result in enumerate(read_back(self.llm, outputs)):
                out[start + k] = result.values[0]
            if progress is not None:
                progress(len(part))
        return torch.from_numpy(out)

    def last_stats(self, corpus: TokenCorpus, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """As :meth:`token_stats`, counting only each text's last token (from read-back values)."""
        acts = self.last_token_activations(corpus.rows, progress).numpy()
        last_groups = [corpus.row_groups(i)[-1] for i in range(len(corpus.rows))]
        return stats_of_rows(acts, last_groups, len(corpus.groups), self.shape, self.threshold)

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _token_labels(labels: Sequence[str], groups: Sequence[int]) -> dict[str, Any]:
    """A request's extra arguments that count each of its tokens in its own group."""
    used, index = np.unique(np.asarray(groups, dtype=np.int64), return_inverse=True)
    return {"kn_steer": {}, TOKEN_GROUPS_KEY: {"labels": [labels[g] for g in used], "index": index.tolist()}}


def stats_of_rows(acts: np.ndarray, group_of: Sequence[int], n_groups: int, shape: ModelShape,
                  threshold: float) -> dict[str, np.ndarray]:
    """Statistics of per-text value rows ``[texts, neurons]`` per group (``last`` positions)."""
    size = (n_groups, shape.num_layers, shape.intermediate_size)
    fires, sums = np.zeros((n_groups, acts.shape[1])), np.zeros((n_groups, acts.shape[1]))
    maxes = np.full((n_groups, acts.shape[1]), -np.inf, dtype=np.float32)
    groups = np.asarray(group_of, dtype=np.int64)
    np.add.at(fires, groups, acts > threshold)
    np.add.at(sums, groups, acts.astype(np.float64))
    np.maximum.at(maxes, groups, acts.astype(np.float32))
    return {"fires": fires.reshape(size), "sums": sums.reshape(size), "maxes": maxes.reshape(size)}
