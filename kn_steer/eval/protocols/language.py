"""Does deactivating one language's neurons raise perplexity on that language far more than on the
others, and far more than random neurons do? (LAPE, Tang et al. 2024.)

On the held-out sentences of a parallel folder (never read by the localization), per set language
``L`` and evaluated language ``E``: the change of log-perplexity (pooled tokens, nats per token)
when ``L``'s neurons are clamped to 0, and the same for ``seeds`` matched random sets (the same
number of neurons in each layer). The claim holds when the matrix's diagonal stands out from its
rows and columns and from the controls' diagonal. Per set, a Wilcoxon signed-rank test over the
sentences of ``L`` compares the set's per-sentence NLL with the first control's.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from kn_steer.data.parallel import ParallelText
from kn_steer.eval.controls import deactivation, matched_neurons
from kn_steer.eval.perplexity import text_nll
from kn_steer.models.families import ModelShape
from kn_steer.stats import compare_paired_signed_rank

Pair = tuple[int, int]


def _log_ppl(values: Sequence[tuple[float, int]]) -> float:
    return sum(v for v, _ in values) / max(sum(n for _, n in values), 1)


def _per_token(values: Sequence[tuple[float, int]]) -> list[float]:
    return [v / max(n, 1) for v, n in values]


def run(model: Any, tokenizer: Any, text: ParallelText, sets: dict[str, Sequence[Pair]],
        languages: Sequence[str] | None = None, seeds: int = 1, max_tokens: int = 48, batch_size: int = 8,
        progress: bool = True) -> dict[str, Any]:
    """The matrix for the sets of ``languages`` (default: every set) evaluated on every one of
    ``languages``; JSON-ready. ``text``: the held-out split."""
    languages = list(languages or sets)
    missing = [lang for lang in languages if lang not in text.texts]
    if missing:
        raise ValueError(f"no held-out text for {', '.join(missing)}")
    shape = ModelShape.from_config(model.config)
    rows = [lang for lang in languages if sets.get(lang)]
    total = len(languages) * (1 + len(rows) * (1 + seeds))
    bar = tqdm(total=total, desc="language perplexity", unit="run", disable=not progress)

    def measure(compiled: Any) -> dict[str, list[tuple[float, int]]]:
        out = {}
        for lang in languages:
            out[lang] = text_nll(model, tokenizer, text.texts[lang], compiled, max_tokens, batch_size)
            bar.update(1)
        return out

    try:
        base = measure(None)
        matrix: dict[str, Any] = {}
        for lang in rows:
            neurons = list(sets[lang])
            conditions = {"set": neurons, **{f"matched/{s}": matched_neurons(neurons, shape, s) for s in range(seeds)}}
            measured = {label: measure(deactivation(chosen, shape)) for label, chosen in conditions.items()}
            delta = {label: {e: _log_ppl(m[e]) - _log_ppl(base[e]) for e in languages}
                     for label, m in measured.items()}
            own = compare_paired_signed_rank(list(zip(_per_token(measured["set"][lang]),
                                                      _per_token(measured["matched/0"][lang])))) if seeds else None
            matrix[lang] = {
                "neurons": len(neurons),
                "set": delta["set"],
                "matched": [delta[f"matched/{s}"] for s in range(seeds)],
                "p_set_vs_matched_on_own": own.p_value if own else None,
            }
    finally:
        bar.close()
    return {"protocol": "language-deactivation", "languages": languages, "sentences": len(text.ids),
            "max_tokens": max_tokens, "seeds": seeds,
            "unsteered_log_ppl": {e: _log_ppl(base[e]) for e in languages},
            "matrix": matrix, "summary": summarize(matrix, languages)}


def summarize(matrix: dict[str, Any], languages: Sequence[str]) -> dict[str, Any]:
    """Mean diagonal vs off-diagonal change, for the sets and for the controls."""
    rows = list(matrix)
    if not rows:
        return {}
    diag = [matrix[l]["set"][l] for l in rows]
    off = [matrix[l]["set"][e] for l in rows for e in languages if e != l]
    control_diag = [statistics.mean(m[l] for m in matrix[l]["matched"]) for l in rows if matrix[l]["matched"]]
    wins = sum(matrix[l]["set"][l] == max(matrix[l]["set"].values()) for l in rows)
    return {"diagonal_mean": statistics.mean(diag), "off_diagonal_mean": statistics.mean(off) if off else math.nan,
            "matched_diagonal_mean": statistics.mean(control_diag) if control_diag else None,
            "rows_whose_own_language_is_hit_most": wins, "rows": len(rows)}


def matrix_plot(result: dict[str, Any], title: str, path: Any) -> None:
    """Heat maps of the change of log-perplexity: sets, and the first control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kn_steer.fileio import atomic_savefig

    rows, cols = list(result["matrix"]), result["languages"]
    grids = {"language sets": [[result["matrix"][l]["set"][e] for e in cols] for l in rows]}
    if result["seeds"]:
        grids["matched random (seed 0)"] = [[result["matrix"][l]["matched"][0][e] for e in cols] for l in rows]
    top = max(abs(v) for g in grids.values() for r in g for v in r) or 1.0
    fig, axes = plt.subplots(1, len(grids), figsize=(5.2 * len(grids), 4.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        image = ax.imshow(torch.tensor(grid).numpy(), cmap="RdBu_r", vmin=-top, vmax=top)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("evaluated language")
        ax.set_ylabel("deactivated set")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, shrink=0.8, label="change of log-perplexity (nats/token)")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def build_set(model: Any, tokenizer: Any, ref: Any, folder: Any, params: Any, probabilities: Any, out: Any, *,
              name: str, description: str, metrics: dict[str, Any], command_data: str | None = None,
              command_out: str | None = None) -> Any:
    """One language's set, written by the library's ``language`` method from activation
    probabilities already computed on the same corpus (``probabilities``: ``(languages, probs,
    tokens)`` from :func:`kn_steer.localize.methods.language.activation_probabilities` under the
    same parameters but ``language``); ``provenance.command`` recomputes them from scratch."""
    from dataclasses import replace

    from kn_steer.data.common import content_sha256
    from kn_steer.localize.command import localize_command, model_argument
    from kn_steer.localize.methods.base import CorpusStats
    from kn_steer.localize.methods.language import LANGUAGE
    from kn_steer.localize.runner import RunInfo, run_localization

    languages, probs, tokens = probabilities

    def reuse(_ctx: Any, _corpus: Any, p: Any) -> CorpusStats:
        return CorpusStats(scores=probs[languages.index(p.language)].float(),
                           info={"languages": languages, "probs": probs, "tokens": tokens})

    corpus = LANGUAGE.load(folder, "parallel", params)
    if list(dict.fromkeys(corpus.languages)) != list(languages):
        raise ValueError("the probabilities were computed for other languages than the parameters name")
    command = localize_command(LANGUAGE.name, params, command_data or str(folder), "parallel",
                               command_out or str(out), name=name, model=model_argument(ref))
    return run_localization(replace(LANGUAGE, accumulate=reuse), params, corpus, model, tokenizer, ref, out,
                            RunInfo(name=name, data_file=command_data or str(folder), description=description,
                                    command=command, metrics=metrics, data_sha256=content_sha256(folder)),
                            progress=False)


__all__ = ["build_set", "matrix_plot", "run", "summarize"]
