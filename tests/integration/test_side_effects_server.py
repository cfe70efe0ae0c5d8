"""Side effects read through a running server (issue 19 item 4), on the shared test server.

The server backend reads every measure (text perplexity, multiple-choice scores, fact recall) from
the completions route's prompt log-probabilities under the request's ``kn_steer`` field. Each must
equal the transformers reference under the same set, and ``kn-steer eval --side-effects SET
--server URL`` must write the table the reference writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from helpers.engines import TEST_SETS, default_ref, sets_dir
from helpers.pararel import FACTS, write_pararel

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SET = "t-boost"  # x3 on 8 middle layers: moves every measure
TEXTS = ["The cat sat on the mat and looked out of the window at the rain.",
         "Paris is the capital of France, and Berlin is the capital of Germany.",
         "She opened the letter slowly, afraid of what it might say about the house.",
         "Water boils at one hundred degrees Celsius at sea level."]
ITEMS = [  # MemoTrap schema: the quote's usual ending is the trap
    {"prompt": 'Write a quote that ends in the word "hold": Enjoy the present day, trusting little to what '
               "tomorrow may", "classes": "[' bring.', ' hold.']", "answer_index": 1},
    {"prompt": 'Write a quote that ends in the word "world": There\'s no such thing as a free',
     "classes": "[' lunch.', ' world.']", "answer_index": 1},
    {"prompt": 'Write a quote that ends in the word "cat": An apple a day keeps the doctor',
     "classes": "[' away.', ' cat.']", "answer_index": 1},
    {"prompt": "Complete the sentence: The early bird catches the", "classes": "[' worm.', ' train.']",
     "answer_index": 0},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("side-effects-server")
    text, task = folder / "texts.jsonl", folder / "memotrap.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    task.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return {"text": text, "task": task, "pararel": write_pararel(folder / "pararel")}


@pytest.fixture(scope="module")
def backends(srv):
    from kn_steer.eval.api import HFEvaluator
    from kn_steer.eval.server_backend import ServerEvaluator

    remote = ServerEvaluator(srv.base_url)
    yield remote, HFEvaluator(default_ref()[0].path, sets_dir=sets_dir())
    remote.close()


def test_a_served_set_is_readable_whole(srv):
    got = httpx.get(f"{srv.base_url}/v1/kn_steer/sets/{SET}", timeout=30)
    assert got.status_code == 200
    assert [(n["layer"], n["index"]) for n in got.json()["neurons"]] == TEST_SETS[SET][0]
    missing = httpx.get(f"{srv.base_url}/v1/kn_steer/sets/no-such-set", timeout=30)
    assert missing.status_code == 404 and "no-such-set" in missing.json()["error"]["message"]


def test_every_measure_through_the_server_equals_the_reference(backends, files):
    remote, local = backends
    assert remote.ref.fingerprint == local.ref.fingerprint
    prompts = [pattern.replace("[X]", x) for pattern, pairs in FACTS.values() for x, _ in pairs]
    prompts = [p[: p.index(" [Y]")] for p in prompts]
    targets = [y for _, pairs in FACTS.values() for _, y in pairs]
    from kn_steer.data import load_items

    items = load_items(files["task"], "memotrap")
    for spec in (None, {"interventions": [{"set": SET}]}):
        for (a, n), (b, m) in zip(remote.text_nll(TEXTS, spec, 24), local.text_nll(TEXTS, spec, 24)):
            assert n == m and a == pytest.approx(b, rel=1e-3)
        for s, r in zip(remote.score(items, spec), local.score(items, spec)):
            assert s.logprobs == pytest.approx(r.logprobs, rel=1e-3, abs=1e-3)
            assert s.neutral == pytest.approx(r.neutral, rel=1e-3, abs=1e-3)
        assert remote.prompt_correct(prompts, targets, spec) == local.prompt_correct(prompts, targets, spec)
    steered = remote.text_nll(TEXTS, {"interventions": [{"set": SET}]}, 24)
    assert all(abs(a - b) > 1e-2 for (a, _), (b, _) in zip(steered, remote.text_nll(TEXTS, None, 24)))


def test_cli_side_effects_through_the_server_writes_the_reference_table(srv, files, tmp_path: Path):
    from kn_steer.cli import app

    args = ["eval", "--side-effects", SET, "--no-default-data", "--text", str(files["text"]), "--task",
            str(files["task"]), "--pararel", str(files["pararel"]), "--seeds", "1", "--doses", "0,3",
            "--sweep-seeds", "1"]
    remote, local = tmp_path / "server.json", tmp_path / "hf.json"
    ran = CliRunner().invoke(app, args + ["--server", srv.base_url, "--out", str(remote)])
    assert ran.exit_code == 0, ran.output
    assert remote.with_suffix(".png").is_file()
    ran = CliRunner().invoke(app, args + ["--model", str(default_ref()[0].path), "--sets", str(sets_dir()),
                                          "--out", str(local)])
    assert ran.exit_code == 0, ran.output
    a, b = json.loads(remote.read_text()), json.loads(local.read_text())
    assert (a["backend"], a["server"], b["backend"]) == ("server", srv.base_url, "hf")
    assert a["neurons"] == len(TEST_SETS[SET][0]) and a["dose"] == b["dose"]
    assert [r["measure"] for r in a["table"]] == [r["measure"] for r in b["table"]]
    for ra, rb in zip(a["table"], b["table"]):
        for key in ("unsteered", "set"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-3), (ra["measure"], key)
        assert ra["matched"]["mean"] == pytest.approx(rb["matched"]["mean"], rel=1e-3)
    # x3 (the set's own dose) in the sweep is the set's row
    at_three = a["sweep"][1]
    for row in a["table"]:
        assert at_three[row["measure"]]["set"] == pytest.approx(row["set"], rel=1e-6)


def test_cli_refuses_a_set_folder_with_a_server(srv):
    from kn_steer.cli import app

    ran = CliRunner().invoke(app, ["eval", "--side-effects", SET, "--server", srv.base_url, "--sets", "x"])
    assert ran.exit_code != 0 and "--sets is the server's to choose" in str(ran.exception)
    ran = CliRunner().invoke(app, ["eval", "--side-effects", "no-such-set", "--server", srv.base_url,
                                   "--no-default-data", "--text", "/dev/null"])
    assert ran.exit_code != 0 and "no neuron set named 'no-such-set'" in str(ran.exception)


def test_cli_eval_reads_scores_from_the_server(srv, backends, files, tmp_path: Path):
    from kn_steer.cli import app

    out = tmp_path / "eval.json"
    ran = CliRunner().invoke(app, ["eval", "--data", str(files["task"]), "--set", SET, "--server", srv.base_url,
                                   "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    got = json.loads(out.read_text())
    assert got["backend"] == "server" and got["n"] == len(ITEMS)
    from kn_steer.data import load_items

    reference = backends[1].score(load_items(files["task"], "memotrap"), {"interventions": [{"set": SET}]})
    assert [i["logprobs"] for i in got["items"]] == [pytest.approx(list(r.logprobs), rel=1e-3, abs=1e-3)
                                                     for r in reference]
