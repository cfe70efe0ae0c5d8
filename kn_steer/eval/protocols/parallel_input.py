"""Does parallel multilingual input *inhibit* neurons? (PiM: feeding the same input in several
languages makes fewer neurons activate, more so as languages are added.)

Measured on the same tokens in every condition: each held sentence in the ``target`` language,
preceded by nothing (monolingual), by its translations into the first ``k`` of ``languages``
(*parallel*), or by *unrelated* sentences in the same ``k`` languages (another sentence's
translations: the same amount and mixture of foreign context, without the parallel meaning).
Counted on the target tokens only, so every condition reads the same ids and a change is the
context's doing. Per layer: the share of (token, neuron) pairs that fire and the share of
neurons that fire on some token of the sentence; per sentence, the share that fire, compared
between conditions with a Wilcoxon signed-rank test.
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

from tqdm.auto import tqdm

from kn_steer.data.parallel import ParallelText
from kn_steer.localize.firing import FiringCounts, count_firing
from kn_steer.stats import compare_paired_signed_rank
from kn_steer.tokens import continuation_ids, leading_special_ids, pad_id


def condition_rows(tokenizer: Any, text: ParallelText, target: str, languages: Sequence[str], k: int,
                   shift: int = 0, max_tokens: int = 48) -> tuple[list[list[int]], list[list[bool]]]:
    """Rows of ids and the flags of their target tokens: ``k`` context sentences (sentence
    ``i + shift`` in each of the first ``k`` languages, one per line), then sentence ``i`` in
    ``target``."""
    lead = leading_special_ids(tokenizer)
    n = len(text.ids)
    rows, keep = [], []
    for i in range(n):
        context: list[int] = []
        for lang in languages[:k]:
            context += continuation_ids(tokenizer, text.texts[lang][(i + shift) % n] + "\n")[:max_tokens]
        mine = continuation_ids(tokenizer, text.texts[target][i])[:max_tokens]
        rows.append(lead + context + mine)
        keep.append([False] * (len(lead) + len(context)) + [True] * len(mine))
    return rows, keep


def _rates(counts: FiringCounts) -> dict[str, Any]:
    units = counts.per_token.shape[1]
    by_layer = (counts.per_token.sum(1).double() / (counts.tokens * units)).tolist()
    any_by_layer = (counts.per_row_any.sum(1).double() / (counts.rows * units)).tolist()
    return {"token_rate": statistics.mean(by_layer), "token_rate_by_layer": by_layer,
            "sentence_rate": statistics.mean(any_by_layer), "sentence_rate_by_layer": any_by_layer}


def run(model: Any, tokenizer: Any, text: ParallelText, target: str, languages: Sequence[str],
        ks: Sequence[int] = (1, 2, 4, 8), max_tokens: int = 48, batch_size: int = 8, progress: bool = True
        ) -> dict[str, Any]:
    """The table; JSON-ready. ``text``: aligned sentences in ``target`` and every one of ``languages``."""
    if target in languages:
        raise ValueError(f"the target language {target!r} cannot be one of the context languages")
    if max(ks) > len(languages):
        raise ValueError(f"k = {max(ks)} needs {max(ks)} context languages, {len(languages)} given")
    if len(text.ids) < 2:
        raise ValueError("at least two sentences are needed (unrelated context is another sentence)")
    shift = len(text.ids) // 2
    plan = [("monolingual", 0, 0)] + [(f"{kind}/{k}", k, s) for k in ks
                                       for kind, s in (("parallel", 0), ("unrelated", shift))]
    bar = tqdm(total=len(plan) * len(text.ids), desc="parallel input", unit="row", disable=not progress)
    measured: dict[str, FiringCounts] = {}
    try:
        for label, k, s in plan:
            rows, keep = condition_rows(tokenizer, text, target, languages, k, s, max_tokens)
            measured[label] = count_firing(model, rows, keep, pad_id(tokenizer), batch_size, bar.update)
    finally:
        bar.close()
    mono = measured["monolingual"].row_rate.tolist()
    table: dict[str, Any] = {"monolingual": _rates(measured["monolingual"])}
    for label, k, _ in plan[1:]:
        rates = measured[label].row_rate.tolist()
        row = {**_rates(measured[label]), "k": k,
               "p_vs_monolingual": compare_paired_signed_rank(list(zip(rates, mono))).p_value}
        if label.startswith("parallel"):
            other = measured[f"unrelated/{k}"].row_rate.tolist()
            row["p_vs_unrelated"] = compare_paired_signed_rank(list(zip(rates, other))).p_value
        table[label] = row
    return {"protocol": "parallel-input", "target": target, "languages": list(languages[:max(ks)]),
            "ks": list(ks), "sentences": len(text.ids), "max_tokens": max_tokens, "conditions": table}


def plot(result: dict[str, Any], title: str, path: Any) -> None:
    """Firing rate per layer on the target tokens, per condition, and the mean against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kn_steer.fileio import atomic_savefig

    table = result["conditions"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(table["monolingual"]["token_rate_by_layer"], color="black", label="monolingual")
    for k in result["ks"]:
        left.plot(table[f"parallel/{k}"]["token_rate_by_layer"], label=f"parallel, {k} languages")
    left.set_xlabel("layer")
    left.set_ylabel("share of (token, neuron) pairs firing")
    left.legend(fontsize=7)
    for kind, style in (("parallel", "o-"), ("unrelated", "s--")):
        right.plot([0] + result["ks"], [table["monolingual"]["token_rate"]]
                   + [table[f"{kind}/{k}"]["token_rate"] for k in result["ks"]], style, label=f"{kind} context")
    right.set_xlabel("context languages")
    right.set_ylabel("mean firing share on the target sentence")
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


__all__ = ["condition_rows", "plot", "run"]
