"""The two-hop protocol's pieces that need no engine: the chain file, the prompts (the worked
example states both hops), judging replies, selection round-robin with the worked example held
out, and the summary's paired tests on known outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kn_steer.data.twohop import TwoHopChain, load_twohop
from kn_steer.errors import DataError
from kn_steer.eval.protocols.two_hop import TwoHopProtocol, judge, prompt, summarize

ROW = {"id": "P495-P36-1-2", "r1": "P495", "r2": "P36", "e1": "soppressata", "e2": "Italy", "e3": "Rome",
       "hop1_prompt": "soppressata was created in", "hop2_prompt": "The capital of Italy is",
       "twohop_prompt": "The capital of the country of origin of soppressata is", "answer": "Rome",
       "shortcut_answer_in_e1": False, "hop1_lineid": 1}


def _chain(**kw) -> TwoHopChain:
    return TwoHopChain.model_validate({**ROW, **kw})


def test_load_validates_and_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "id": "b", "hop1_prompt": None}) + "\n")
    chains = load_twohop(path)
    assert [c.prompt_ended for c in chains] == [True, False] and chains[0].pair == "P495-P36"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "e3": ""}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'e3'"):
        load_twohop(path)


def test_prompts_share_the_worked_example() -> None:
    chain, example = _chain(), _chain(id="x", e1="Gummi candy", e2="Germany", e3="Berlin", answer="Berlin",
                                      hop1_prompt="Gummi candy was created in", hop2_prompt="The capital of Germany is",
                                      twohop_prompt="The capital of the country of origin of Gummi candy is")
    direct, cot = prompt("direct", chain, example), prompt("cot", chain, example)
    assert direct.endswith("Question: The capital of the country of origin of soppressata is what?\nAnswer:")
    assert "Answer: Berlin\n\n" in direct and "Reasoning" not in direct
    assert "Reasoning: Gummi candy was created in Germany. The capital of Germany is Berlin.\nAnswer: Berlin" in cot
    assert cot.endswith("soppressata is what?\nReasoning:")


def test_judge() -> None:
    c = _chain()
    assert judge("direct", c, " Rome\nQuestion: ...") == {"correct": True}
    assert judge("direct", c, " Paris\nRome") == {"correct": False}  # only the first line counts
    assert judge("cot", c, " soppressata was created in Italy. The capital of Italy is Rome.\nAnswer: Rome\n") == \
        {"correct": True, "bridge": True}
    assert judge("cot", c, " It was made in Spain.\nAnswer: Madrid\n\nQuestion: Rome") == {"correct": False, "bridge": False}


def test_select_holds_out_each_pairs_worked_example() -> None:
    proto = TwoHopProtocol.__new__(TwoHopProtocol)
    proto.two_hop = type("C", (), {"chains": 3})()
    a = [_chain(id=f"a{i}") for i in range(3)]
    b = [_chain(id=f"b{i}", r1="P17") for i in range(2)]
    lone = [_chain(id="c0", r1="P19")]  # one known chain: only an example, so the pair is dropped
    chains, examples = proto.select({"P495-P36": a, "P17-P36": b, "P19-P36": lone})
    assert [c.id for c in chains] == ["a1", "b1", "a2"]
    assert {p: e.id for p, e in examples.items()} == {"P495-P36": "a0", "P17-P36": "b0"}


def test_summary_tests_pairs_by_chain() -> None:
    rows = []
    for k in range(12):
        row = {"pair": "p"}
        for style in ("direct", "cot"):
            row.update({f"{style}_correct_base": 1.0, f"{style}_correct_suppress": float(k % 6 == 0),
                        f"{style}_correct_enhance": 1.0, f"{style}_correct_matched_suppress": 1.0,
                        f"{style}_correct_matched_enhance": 1.0})
        row.update({"cot_bridge_base": 1.0, "cot_bridge_suppress": 0.0, "cot_bridge_enhance": 1.0,
                    "cot_bridge_matched_suppress": 0.8, "cot_bridge_matched_enhance": 1.0})
        row.update({"logprob_base": -2.0, "logprob_suppress": -5.0, "logprob_enhance": -1.5,
                    "logprob_matched_suppress": -2.1, "logprob_matched_enhance": -1.9})
        rows.append(row)
    s = summarize(rows)
    assert s["chains"] == 12 and s["direct_correct"]["suppress"] == pytest.approx(2 / 12)
    assert s["direct_correct"]["p_suppress_vs_base"] < 0.01  # 10 losses, no win: exact McNemar
    assert s["direct_correct"]["p_enhance_vs_base"] == 1.0
    assert s["cot_bridge"]["p_suppress_vs_matched"] < 0.01
    assert s["answer_logprob_change"]["suppress"] == pytest.approx(-3.0)
