"""The three scoring rules, the relative-length split, paired tests and the result cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from kn_steer.errors import KnSteerError
from kn_steer.eval.cache import ResultCache, cache_key
from kn_steer.eval.scoring import ItemScore
from kn_steer.eval.summary import control_summary, paired, summarize


def _item(id: str, logprobs, lengths, neutral=None, faithful=0, trap=1) -> ItemScore:
    return ItemScore(id, tuple(logprobs), faithful, trap, tuple(lengths), None if neutral is None else tuple(neutral))


def test_rules_pick_different_winners() -> None:
    # faithful choice 0 has 4 tokens, the trap 1 token: total log-prob prefers the short trap
    s = _item("a", logprobs=[-4.0, -3.0], lengths=[4, 1], neutral=[-9.0, -2.0])
    assert s.chosen_by("total") == 1 and s.trapped_by("total")
    assert s.chosen_by("mean") == 0  # -1.0 per token against -3.0
    assert s.scores("calibrated") == (5.0, -1.0) and s.correct_by("calibrated")
    assert s.length_group == "longer"
    assert _item("b", [-1, -2], [1, 3]).length_group == "shorter"
    assert _item("c", [-1, -2], [2, 2]).length_group == "equal"
    # no trap: the rival is the shortest other choice
    assert _item("d", [-1, -2, -3], [2, 5, 1], trap=None).length_group == "longer"
    with pytest.raises(KnSteerError, match="without the neutral premise"):
        _item("e", [-1, -2], [1, 1]).scores("calibrated")
    with pytest.raises(KnSteerError, match="unknown scoring rule"):
        s.scores("median")
    assert ItemScore.from_json(s.to_json()) == s


def test_summary_splits_by_length_and_rule() -> None:
    scores = [_item("a", [-4, -3], [4, 1], [-9, -2]), _item("b", [-1, -2], [1, 3], [-1, -1]),
              _item("c", [-2, -1], [2, 2], [-3, -1])]
    summary = summarize(scores)
    assert summary["n"] == 3 and summary["accuracy"] == pytest.approx(1 / 3)
    total = summary["rules"]["total"]["by_length"]
    assert total["shorter"] == {"n": 1, "accuracy": 1.0} and total["longer"] == {"n": 1, "accuracy": 0.0}
    assert summary["rules"]["calibrated"]["accuracy"] == 1.0 and summary["rules"]["mean"]["accuracy"] == pytest.approx(1 / 3)
    assert "calibrated" not in summarize([_item("x", [-1, -2], [1, 1])])["rules"]


def test_paired_test_counts_discordant_items() -> None:
    base = [_item(str(i), [-1, -2] if i < 10 else [-2, -1], [1, 1]) for i in range(20)]  # 10 right
    better = [_item(str(i), [-1, -2], [1, 1]) for i in range(20)]  # 20 right
    test = paired(better, base, "total")
    assert (test["items_won"], test["items_lost"]) == (10, 0)
    assert test["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert paired(base, base, "total")["p_value"] == 1.0
    with pytest.raises(ValueError, match="same items"):
        paired(better[:3], base[:2], "total")
    summary = control_summary([base, better], base, better, "total")
    assert summary["accuracy"]["mean"] == pytest.approx(0.75) and summary["p_vs_unsteered"][0] == 1.0
    assert summary["p_set_vs_control"][1] == 1.0 and summary["accuracy"]["sd"] > 0


def test_cache_keys_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    cache = ResultCache(path)
    k1 = cache_key(model="m", data="sha1", spec=None)
    assert k1 == cache_key(spec=None, data="sha1", model="m") != cache_key(model="m", data="sha2", spec=None)
    calls = []
    assert cache.compute(k1, lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert cache.compute(k1, lambda: calls.append(1) or {"v": 2}) == {"v": 1} and calls == [1]
    with path.open("a") as handle:
        handle.write('{"key": "torn", "val')
    reopened = ResultCache(path)
    assert reopened.get(k1) == {"v": 1} and "torn" not in reopened
    reopened.put("k2", [1, 2])
    assert ResultCache(path).get("k2") == [1, 2] and len(ResultCache(path)) == 2


def _append_many(path: str, tag: str, n: int) -> None:
    cache = ResultCache(path)
    for i in range(n):
        cache.put(f"{tag}-{i}", {"tag": tag, "payload": "x" * 70_000})  # larger than any pipe/stdio buffer


def _open_many(path: str, n: int) -> None:
    for _ in range(n):
        ResultCache(path)  # loading drops a torn tail: it must never take a line being written


def test_cache_shared_by_processes_keeps_every_line(tmp_path: Path) -> None:
    """Reproduction runs sharing one cache (two appending, one opening it over and over): no line
    is interleaved, and no line being written is taken for a torn one and truncated."""
    import multiprocessing

    path = str(tmp_path / "shared.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, tag, 60)) for tag in ("a", "b")]
    procs.append(ctx.Process(target=_open_many, args=(path, 300)))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    reopened = ResultCache(path)
    assert len(reopened) == 120
    assert all(reopened.get(f"{t}-{i}")["tag"] == t for t in ("a", "b") for i in range(60))


@pytest.mark.parametrize("bos", [False, True])
def test_packed_scoring_equals_separate_forwards_on_a_tiny_model(bos: bool) -> None:
    """Choices of one to four tokens, prompts of different lengths, several batch sizes: only the
    columns that predict a choice token go through the LM head, and the totals still equal one
    forward per (prompt, choice)."""
    import torch
    from helpers.tiny import build_tiny_model
    from helpers.tokenizer import word_tokenizer

    from kn_steer.data.common import NEUTRAL_PROMPT, ChoiceItem
    from kn_steer.eval.scoring import encode_items, score_hf
    from kn_steer.tokens import continuation_ids, prompt_ids

    model, tok = build_tiny_model("llama", seed=2), word_tokenizer(bos=bos)
    prompts = ["the capital of france is", "kings", "write a quote that ends in the word"]
    choices = (" paris", " the city", " no", " penny wise pound foolish")
    items = [ChoiceItem(id=f"i{k}", prompt=p, choices=choices, faithful=0, trap=1, context="", question_prompt=p)
             for k, p in enumerate(prompts)]

    def separate(prompt: str, choice: str) -> float:
        head, tail = prompt_ids(tok, prompt), continuation_ids(tok, choice)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([head + tail])).logits[0].float(), -1)
        return sum(float(logp[len(head) - 1 + k, t]) for k, t in enumerate(tail))

    encoded = encode_items(tok, items)
    assert sorted({len(c) for c in encoded[0].choice_ids}) == [1, 2, 4]
    for batch_size in (1, 2, 3):
        for item, score in zip(items, score_hf(model, tok, encoded, batch_size=batch_size)):
            assert score.logprobs == pytest.approx([separate(item.prompt, c) for c in choices], abs=1e-4)
            assert score.neutral == pytest.approx([separate(NEUTRAL_PROMPT, c) for c in choices], abs=1e-4)


def test_a_duplicated_answer_is_a_tie() -> None:
    from kn_steer.eval.protocols.ircan import _tied

    twice = _item("dup", [-1.5, -1.5, -6.0], [3, 3, 3], [-20.0, -20.0, -19.0])
    assert _tied(twice, "total") and _tied(twice, "calibrated") and twice.correct_by("total")
    assert not _tied(_item("one", [-1.5, -1.6], [3, 3]), "total")
