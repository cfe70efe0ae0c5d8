"""A/B layer without a server: config validation, assignment, log, hooks, routes, statistics, report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from helpers.paths import ROOT
from kn_steer.ab import assign as assign_mod
from kn_steer.ab.config import load_config, parse_config, validate_specs
from kn_steer.ab.log import AssignmentLog, read_log
from kn_steer.errors import KnSteerError, SpecError
from kn_steer.models.families import ModelShape
from kn_steer.sets.format import MethodInfo, ModelIdentity, Neuron, NeuronSet, Operation
from kn_steer.steering.spec import SteeringSpec

SHAPE = ModelShape(30, 1536)
IDENTITY = ModelIdentity(name="test-model", fingerprint="sha256:test", architecture="LlamaForCausalLM",
                         num_layers=30, intermediate_size=1536)


def make_set(name: str, neurons=((3, 10), (5, 700))) -> NeuronSet:
    return NeuronSet(name=name, model=IDENTITY, method=MethodInfo(name="test"),
                     operation=Operation(op="scale", factor=2.0),
                     neurons=[Neuron(layer=l, index=i) for l, i in neurons])


SETS = {"boost": make_set("boost")}


def config_dict(**overrides):
    exp = {
        "name": "exp1",
        "arms": [
            {"name": "control", "kn_steer": None, "weight": 1},
            {"name": "boost", "kn_steer": {"interventions": [{"set": "boost", "op": "scale", "factor": 3}]}, "weight": 1},
            {"name": "clamp", "kn_steer": {"interventions": [{"neurons": [[0, 5]], "op": "clamp", "value": 0}]}, "weight": 2},
        ],
    }
    exp.update(overrides)
    return {"experiments": [exp]}


# ----- config -------------------------------------------------------------------------------------
def test_valid_config_describes_shares():
    cfg = parse_config(config_dict())
    validate_specs(cfg, SETS, SHAPE)
    desc = cfg.experiments[0].describe()
    assert desc["control"] == "control"
    assert [a["share"] for a in desc["arms"]] == [0.25, 0.25, 0.5]


def test_example_config_is_valid_for_the_shipped_sets(default_ref):
    """examples/experiments.json passes the start-up check against neuron_sets/ and the default model."""
    from transformers import AutoConfig

    from kn_steer.sets.format import model_identity
    from kn_steer.sets.registry import NeuronSetRegistry

    config = AutoConfig.from_pretrained(default_ref.path)
    sets = NeuronSetRegistry.load(ROOT / "neuron_sets", model_identity(default_ref, config))
    cfg = load_config(ROOT / "examples" / "experiments.json")
    validate_specs(cfg, sets, ModelShape.from_config(config))
    assert len(cfg.experiments) == 2


@pytest.mark.parametrize("weight", [0, -1.5, "nan"])
def test_non_positive_weight_is_refused(weight):
    raw = config_dict()
    raw["experiments"][0]["arms"][1]["weight"] = float(weight) if weight == "nan" else weight
    with pytest.raises(KnSteerError, match=r"experiments\[0\] \('exp1'\)\.arms\[1\] \('boost'\)\.weight: weight must be a positive"):
        parse_config(raw)


def test_duplicate_arm_names_are_refused():
    raw = config_dict()
    raw["experiments"][0]["arms"][2]["name"] = "boost"
    with pytest.raises(KnSteerError, match=r"experiments\[0\] \('exp1'\): duplicate arm name\(s\) \['boost'\]"):
        parse_config(raw)


def test_duplicate_experiment_names_are_refused():
    raw = config_dict()
    raw["experiments"].append(dict(raw["experiments"][0]))
    with pytest.raises(KnSteerError, match=r"duplicate experiment name\(s\) \['exp1'\]"):
        parse_config(raw)


def test_unknown_set_is_refused_with_its_arm():
    raw = config_dict()
    raw["experiments"][0]["arms"][1]["kn_steer"]["interventions"][0]["set"] = "nope"
    cfg = parse_config(raw)
    with pytest.raises(KnSteerError) as err:
        validate_specs(cfg, SETS, SHAPE, source="exp.json")
    msg = str(err.value)
    assert "exp.json" in msg and "experiment 'exp1' arm 'boost'" in msg
    assert "unknown neuron set 'nope'" in msg and "known: boost" in msg
    with pytest.raises(KnSteerError, match="unknown neuron set 'nope'"):  # names-only check, no shape
        validate_specs(cfg, SETS, None)


def test_out_of_range_neuron_is_refused():
    raw = config_dict()
    raw["experiments"][0]["arms"][2]["kn_steer"]["interventions"][0]["neurons"] = [[0, 5000]]
    with pytest.raises(KnSteerError, match=r"arm 'clamp'.*index 5000 out of range"):
        validate_specs(parse_config(raw), SETS, SHAPE)


def test_bad_control_and_bad_file(tmp_path):
    with pytest.raises(KnSteerError, match="control arm 'zzz' is not one of the arms"):
        parse_config(config_dict(control="zzz"))
    path = tmp_path / "bad.json"
    path.write_text('{"experiments": [\n  {"name": "x",}\n]}')
    with pytest.raises(KnSteerError, match=r"bad.json:2:\d+: not valid JSON"):
        load_config(path)


# ----- assignment ---------------------------------------------------------------------------------
def test_same_unit_same_arm_and_random_without_unit():
    weights = [1.0, 1.0, 2.0]
    first = [assign_mod.assign("exp1", weights, f"user-{i}") for i in range(200)]
    again = [assign_mod.assign("exp1", weights, f"user-{i}") for i in range(200)]
    assert first == again and all(how == "hash" for _, how in first)
    other = [assign_mod.assign("exp2", weights, f"user-{i}")[0] for i in range(200)]
    assert other != [a for a, _ in first]  # the experiment name is part of the hash
    draws = {assign_mod.assign("exp1", weights, None) for _ in range(200)}
    assert {how for _, how in draws} == {"random"} and {a for a, _ in draws} == {0, 1, 2}


def test_assignment_is_stable_across_processes_and_hash_seeds():
    code = ("from kn_steer.ab.assign import assign; import json; "
            "print(json.dumps([assign('exp1', [1, 3, 0.5], f'u{i}')[0] for i in range(300)]))")
    mine = [assign_mod.assign("exp1", [1, 3, 0.5], f"u{i}")[0] for i in range(300)]
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, cwd=ROOT)
        assert json.loads(out.stdout) == mine


def test_arm_proportions_match_weights():
    weights = [1.0, 2.0, 7.0]
    n = 20000
    counts = Counter(assign_mod.assign("traffic", weights, f"unit-{i}")[0] for i in range(n))
    for arm, w in enumerate(weights):
        p = w / sum(weights)
        low, high = stats.binom.ppf([0.00005, 0.99995], n, p)  # 99.99% two-sided bounds
        assert low <= counts[arm] <= high, (arm, counts[arm], low, high)
    random_counts = Counter(assign_mod.assign("traffic", weights, None)[0] for _ in range(n))
    for arm, w in enumerate(weights):
        low, high = stats.binom.ppf([0.00005, 0.99995], n, w / sum(weights))
        assert low <= random_counts[arm] <= high


def test_pick_edges():
    assert assign_mod.pick([1, 1], 0.0) == 0
    assert assign_mod.pick([1, 1], 0.4999) == 0
    assert assign_mod.pick([1, 1], 0.5) == 1
    assert assign_mod.pick([1, 1], 0.999999) == 1


# ----- hooks as the serving side calls them --------------------------------------------------------
@pytest.fixture()
def installed(tmp_path, monkeypatch):
    """The A/B layer installed from a config file, against a real registry/shape context."""
    import kn_steer.ab as ab

    cfg_path = tmp_path / "experiments.json"
    cfg_path.write_text(json.dumps(config_dict()))
    log_path = tmp_path / "ab.jsonl"
    monkeypatch.setenv("KN_STEER_EXPERIMENTS", str(cfg_path))
    monkeypatch.setenv("KN_STEER_AB_LOG", str(log_path))

    class Ctx:  # the fields of kn_steer.serving.context.ServingContext that the A/B layer reads
        registry = SETS
        shape = SHAPE
        max_neurons = 1000

    _isolate_hooks(monkeypatch)
    yield ab.install(context=Ctx(), force=True)


def _isolate_hooks(monkeypatch) -> None:
    """Empty extension points and no installed service for this test; monkeypatch restores both
    (an engine built earlier in this process may have installed the A/B layer already)."""
    import kn_steer.ab as ab
    from kn_steer.serving import hooks

    monkeypatch.setattr(hooks, "experiment_resolver", None)
    monkeypatch.setattr(hooks, "request_listeners", [])
    monkeypatch.setattr(hooks, "route_installers", [])
    monkeypatch.setattr(ab, "_service", None)


def _sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_install_is_idempotent_and_registers_hooks(installed):
    import kn_steer.ab as ab
    from kn_steer.serving import hooks

    assert ab.install() is installed
    assert hooks.experiment_resolver == installed.resolve
    assert hooks.request_listeners.count(installed.on_request) == 1


def test_install_refuses_a_bad_config(tmp_path, monkeypatch):
    import kn_steer.ab as ab

    raw = config_dict()
    raw["experiments"][0]["arms"][1]["kn_steer"]["interventions"][0]["set"] = "missing-set"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))

    class Ctx:
        registry, shape, max_neurons = SETS, SHAPE, 1000

    previous = ab.current_service()
    with pytest.raises(KnSteerError, match=r"(?s)bad.json.*arm 'boost'.*unknown neuron set 'missing-set'"):
        ab.install(path, context=Ctx(), force=True)
    assert ab.current_service() is previous  # a refused config changes nothing


def test_resolver_and_listener(installed, tmp_path):
    from kn_steer.serving import hooks

    spec = SteeringSpec(experiment="exp1", unit="alice")
    resolved, info = hooks.experiment_resolver(spec, "req-1")
    assert info["experiment"] == "exp1" and info["unit"] == "alice" and info["assignment"] == "hash"
    arm = installed.config.get("exp1").arm(info["arm"])
    assert resolved.experiment is None and resolved.interventions == arm.spec().interventions
    for k in range(5):  # same unit, same arm
        assert hooks.experiment_resolver(spec, f"req-x{k}")[1]["arm"] == info["arm"]
    with pytest.raises(SpecError, match="unknown experiment 'nope'.*known: exp1"):
        hooks.experiment_resolver(SteeringSpec(experiment="nope"), "req-2")

    labels = {"experiment": "exp1", "arm": info["arm"]}
    before = {n: _sample(n, labels) for n in ("kn_steer_ab_requests_total", "kn_steer_ab_errors_total",
                                               "kn_steer_ab_prompt_tokens_total", "kn_steer_ab_generation_tokens_total",
                                               "kn_steer_ab_request_latency_seconds_count")}
    record = {"request_id": "req-1", "endpoint": "completions", "kn_steer": {"applied": [], **info},
              "prompt_tokens": 7, "completion_tokens": 5, "latency_s": 0.2, "error": False, "status": 200}
    hooks.notify_request(record)
    hooks.notify_request({**record, "request_id": "req-3", "error": True, "status": 500, "completion_tokens": None})
    hooks.notify_request({**record, "request_id": "plain", "kn_steer": None})  # not an experiment: ignored
    after = {n: _sample(n, labels) for n in before}
    assert after["kn_steer_ab_requests_total"] - before["kn_steer_ab_requests_total"] == 2
    assert after["kn_steer_ab_errors_total"] - before["kn_steer_ab_errors_total"] == 1
    assert after["kn_steer_ab_prompt_tokens_total"] - before["kn_steer_ab_prompt_tokens_total"] == 14
    assert after["kn_steer_ab_generation_tokens_total"] - before["kn_steer_ab_generation_tokens_total"] == 5
    assert after["kn_steer_ab_request_latency_seconds_count"] - before["kn_steer_ab_request_latency_seconds_count"] == 2

    lines = [json.loads(l) for l in installed.log.path.read_text().splitlines()]
    assert [l["request_id"] for l in lines] == ["req-1", "req-3"]
    first = lines[0]
    assert first["type"] == "assignment" and first["arm"] == info["arm"] and first["unit"] == "alice"
    assert first["usage"] == {"prompt_tokens": 7, "completion_tokens": 5} and "prompt" not in first
    assert first["is_control"] == (info["arm"] == "control")


def test_routes_list_experiments_and_accept_outcomes(installed):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from kn_steer.serving import hooks

    app = FastAPI()
    hooks.install_routes(app)
    client = TestClient(app)
    listing = client.get("/v1/kn_steer/experiments").json()
    assert listing["data"][0]["name"] == "exp1"
    assert [(a["name"], a["weight"]) for a in listing["data"][0]["arms"]] == [("control", 1), ("boost", 1), ("clamp", 2)]

    _, info = hooks.experiment_resolver(SteeringSpec(experiment="exp1", unit="bob"), "req-b")
    hooks.notify_request({"request_id": "req-b", "kn_steer": info, "prompt_tokens": 3,
                          "completion_tokens": 2, "latency_s": 0.1, "error": False, "status": 200})
    ok = client.post("/v1/kn_steer/outcomes", json={"request_id": "req-b", "outcome": True})
    assert ok.status_code == 200 and ok.json()["outcome"] is True
    # a record without "response_id" (serving before it sent one) is logged under its request id;
    # the response id form (cmpl-<request id>) still finds it
    ok = client.post("/v1/kn_steer/outcomes", json={"request_id": "cmpl-req-b", "outcome": False})
    assert ok.status_code == 200 and ok.json()["request_id"] == "req-b"
    for body, needle in [
        ({"request_id": "nope", "outcome": True}, "unknown request id 'nope'"),
        ({"request_id": "req-b", "outcome": 0.5}, "takes binary outcomes (set by the experiment's first outcome)"),
        ({"request_id": "req-b", "outcome": "yes"}, "outcome must be true, false or a finite number"),
        ({"request_id": "req-b"}, "'outcome' is missing"),
        ({"request_id": "req-b", "outcome": 1, "extra": 1}, "unknown field"),
        ([1, 2], "body must be a JSON object"),
    ]:
        bad = client.post("/v1/kn_steer/outcomes", json=body)
        assert bad.status_code == 400 and needle in bad.json()["error"]["message"], (body, bad.text)
    bad = client.post("/v1/kn_steer/outcomes", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    joined = read_log(installed.log.path).requests["req-b"]
    assert joined.outcome is False  # the last outcome wins


def test_without_config_experiments_are_a_spec_error(tmp_path, monkeypatch):
    import kn_steer.ab as ab
    from kn_steer.serving import hooks

    monkeypatch.delenv("KN_STEER_EXPERIMENTS", raising=False)
    _isolate_hooks(monkeypatch)
    service = ab.install(log_path=tmp_path / "x.jsonl", force=True)
    assert service.config is None and service.on_request not in hooks.request_listeners
    with pytest.raises(SpecError, match="no experiments configured"):
        hooks.experiment_resolver(SteeringSpec(experiment="exp1"), "r")


def test_appends_are_whole_lines_under_threads(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    log = AssignmentLog(tmp_path / "t.jsonl")
    payload = "x" * 5000

    def write(i: int) -> None:
        log.append({"type": "outcome", "request_id": f"r{i}", "outcome": True, "time": "t", "source": payload})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(400)))
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert len(lines) == 400 and {json.loads(l)["request_id"] for l in lines} == {f"r{i}" for i in range(400)}


# ----- statistics and report ----------------------------------------------------------------------
def synthetic_log(path: Path, rates: dict[str, float], n: int, seed: int, numeric: bool = False) -> Path:
    """A log as the server writes it: assignments, then outcomes drawn with the given rates/means."""
    rng = np.random.default_rng(seed)
    log = AssignmentLog(path)
    for arm, rate in rates.items():
        for i in range(n):
            rid = f"{arm}-{i}"
            log.append({"type": "assignment", "request_id": rid, "experiment": "exp1", "arm": arm,
                        "unit": f"u{i}", "assignment": "hash", "time": "2026-01-01T00:00:00Z",
                        "latency_s": float(rng.uniform(0.1, 0.3)), "is_control": arm == "control",
                        "usage": {"prompt_tokens": 10, "completion_tokens": 4}, "error": False, "status": 200})
            value = float(rng.normal(rate, 1.0)) if numeric else bool(rng.random() < rate)
            log.append({"type": "outcome", "request_id": rid, "outcome": value, "time": "t", "source": "test"})
    return path


def test_wilson_interval_known_values():
    from kn_steer.stats import wilson

    iv = wilson(81, 263)  # textbook example: 0.3080, [0.2553, 0.3662]
    assert math.isclose(iv.estimate, 0.30798, abs_tol=1e-4)
    assert math.isclose(iv.low, 0.2553, abs_tol=5e-4) and math.isclose(iv.high, 0.3662, abs_tol=5e-4)
    assert wilson(0, 10).low == 0.0 and wilson(10, 10).high == 1.0


def test_report_finds_a_known_binary_difference(tmp_path):
    from kn_steer.ab.report import build_report

    path = synthetic_log(tmp_path / "diff.jsonl", {"control": 0.50, "treat": 0.60}, 2000, seed=1)
    (rep,) = build_report(path)
    assert rep.kind == "binary" and rep.control == "control"
    treat = next(s for s in rep.arms if s.arm == "treat")
    assert treat.vs_control.test == "chi2" and treat.vs_control.p_value < 0.01
    assert 0.05 < treat.vs_control.difference < 0.15
    assert treat.value.low < treat.value.estimate < treat.value.high and treat.requests == 2000


def test_report_without_a_difference_is_not_significant(tmp_path):
    from kn_steer.ab.report import build_report

    path = synthetic_log(tmp_path / "same.jsonl", {"control": 0.5, "a": 0.5, "b": 0.5}, 500, seed=7)
    (rep,) = build_report(path)
    for s in rep.arms:
        if not s.is_control:
            assert s.vs_control.p_value > 0.05 and s.vs_control.p_holm >= s.vs_control.p_value


def test_numeric_outcomes_use_welch(tmp_path):
    from kn_steer.ab.report import build_report

    path = synthetic_log(tmp_path / "num.jsonl", {"control": 0.0, "treat": 0.3}, 400, seed=3, numeric=True)
    (rep,) = build_report(path)
    treat = next(s for s in rep.arms if s.arm == "treat")
    assert rep.kind == "numeric" and treat.vs_control.test == "welch" and treat.vs_control.p_value < 0.01


def test_small_counts_use_fisher(tmp_path):
    from kn_steer.stats import compare_binary

    res = compare_binary(9, 10, 2, 10)
    assert res.test == "fisher"
    assert math.isclose(res.p_value, stats.fisher_exact([[9, 1], [2, 8]]).pvalue)


def test_report_cli_writes_png_and_json(tmp_path):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    path = synthetic_log(tmp_path / "diff.jsonl", {"control": 0.4, "treat": 0.7}, 300, seed=2)
    png, out = tmp_path / "plots" / "ab.png", tmp_path / "ab.json"
    result = CliRunner().invoke(app, ["ab", "report", "--log", str(path), "--plot", str(png), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "treat" in result.output and "chi2" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    data = json.loads(out.read_text())["experiments"][0]
    assert data["control"] == "control"
    assert data["arms"][1]["vs_control"]["p_value"] < 0.01
    assert not list(png.parent.glob(".*"))  # no temporary file left behind


def test_outcome_cli(tmp_path):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    path = synthetic_log(tmp_path / "o.jsonl", {"control": 0.5}, 3, seed=0)
    runner = CliRunner()
    result = runner.invoke(app, ["ab", "outcome", "--log", str(path), "control-1", "false"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["ab", "outcome", "--log", str(path), "cmpl-control-2", "success"])
    assert result.exit_code == 0, result.output
    rows = read_log(path).requests
    assert rows["control-1"].outcome is False and rows["control-2"].outcome is True
    result = runner.invoke(app, ["ab", "outcome", "--log", str(path), "control-2", "--", "-2.5"])
    assert isinstance(result.exception, KnSteerError) and "takes binary outcomes" in str(result.exception)
    numeric = synthetic_log(tmp_path / "n.jsonl", {"control": 0.5}, 3, seed=0, numeric=True)
    result = runner.invoke(app, ["ab", "outcome", "--log", str(numeric), "control-2", "--", "-2.5"])
    assert result.exit_code == 0, result.output
    assert read_log(numeric).requests["control-2"].outcome == -2.5
    result = runner.invoke(app, ["ab", "outcome", "--log", str(path), "ghost", "true"])
    assert isinstance(result.exception, KnSteerError) and "unknown request id 'ghost'" in str(result.exception)
    result = runner.invoke(app, ["ab", "outcome", "--log", str(path), "control-1", "maybe"])
    assert isinstance(result.exception, KnSteerError) and "neither true/false nor a number" in str(result.exception)


def test_bad_log_line_names_file_and_line(tmp_path):
    from kn_steer.ab.report import build_report
    from kn_steer.errors import DataError

    path = synthetic_log(tmp_path / "b.jsonl", {"control": 0.5}, 2, seed=0)
    with path.open("a") as f:
        f.write('{"type": "assignment", "request_id": "x"}\n')
    with pytest.raises(DataError, match=r"b.jsonl:5: field 'experiment'"):
        build_report(path)


def test_prompt_text_is_logged_only_when_switched_on(tmp_path):
    from kn_steer.ab.service import ABService

    cfg = parse_config(config_dict())
    for switch, name in ((False, "off.jsonl"), (True, "on.jsonl")):
        service = ABService(cfg, tmp_path / name, log_prompts=switch)
        _, info = service.resolve(SteeringSpec(experiment="exp1", unit="u"), "r1")
        service.on_request({"request_id": "r1", "kn_steer": info, "prompt": "secret text",
                            "prompt_tokens": 2, "completion_tokens": 1, "latency_s": 0.01, "error": False})
        line = json.loads((tmp_path / name).read_text())
        assert ("prompt" in line) is switch and (not switch or line["prompt"] == "secret text")


def test_check_cli_validates_against_the_default_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kn_steer.cli import app

    (tmp_path / "sets").mkdir()
    result = CliRunner().invoke(app, ["ab", "check", "--config", str(ROOT / "examples" / "experiments.json"),
                                      "--sets", str(ROOT / "neuron_sets")])
    assert result.exit_code == 0, result.output
    assert "control 50%" in result.output and result.output.strip().endswith("ok")
    monkeypatch.setenv("KN_STEER_NEURON_SETS", str(tmp_path / "sets"))  # an empty registry
    result = CliRunner().invoke(app, ["ab", "check", "--config", str(ROOT / "examples" / "experiments.json")])
    assert isinstance(result.exception, KnSteerError)
    assert "unknown neuron set 'smollm2-135m-context-memotrap'" in str(result.exception)
    raw = config_dict()
    (tmp_path / "c.json").write_text(json.dumps(raw))
    result = CliRunner().invoke(app, ["ab", "check", "--config", str(tmp_path / "c.json")])
    assert isinstance(result.exception, KnSteerError) and "unknown neuron set 'boost'" in str(result.exception)


def test_offline_loaders_read_both_formats():
    from kn_steer.ab.offline import load_items

    data = Path("/work/shared/data")
    if not data.exists():
        pytest.skip("shared data not available")
    memo = load_items(data / "memotrap" / "dev.jsonl", "memotrap", limit=3)
    kre = load_items(data / "kre" / "cose_dev.json", "kre", limit=3)
    assert len(memo) == 3 and len(kre) == 3 and all(len(i.choices) >= 2 for i in memo + kre)
    with pytest.raises(KnSteerError, match="unknown data format"):
        load_items(data / "kre" / "cose_dev.json", "csv")  # type: ignore[arg-type]


def test_unwritable_log_refuses_to_start(tmp_path):
    from kn_steer.ab.service import ABService

    (tmp_path / "a-dir").mkdir()
    with pytest.raises(KnSteerError, match=r"cannot write the A/B log .*a-dir"):
        ABService(parse_config(config_dict()), tmp_path / "a-dir")


def test_offline_logs_are_compared_unit_by_unit(tmp_path):
    """Offline runs score the same units in every arm: McNemar sees a small consistent gain that an
    independent-samples test misses."""
    from kn_steer.ab.report import build_report

    rng = np.random.default_rng(11)
    control = rng.random(600) < 0.6
    flip = rng.random(600) < 0.06  # the treatment fixes 6% of the units and breaks none
    treat = control | flip
    log = AssignmentLog(tmp_path / "off.jsonl")
    for arm, outcomes in (("control", control), ("treat", treat)):
        for i, ok in enumerate(outcomes):
            rid = f"{arm}-{i}"
            log.append({"type": "assignment", "request_id": rid, "experiment": "exp1", "arm": arm,
                        "unit": f"item-{i}", "assignment": "offline", "time": "t", "is_control": arm == "control"})
            log.append({"type": "outcome", "request_id": rid, "outcome": bool(ok), "time": "t"})
    (paired,) = build_report(log.path)
    t = next(s for s in paired.arms if s.arm == "treat").vs_control
    wins = int((treat & ~control).sum())
    assert paired.paired and t.test == "mcnemar" and t.p_value < 0.01
    assert math.isclose(t.p_value, stats.binomtest(wins, wins, 0.5).pvalue)
    assert math.isclose(t.difference, treat.mean() - control.mean())
    from kn_steer.ab.log import read_log as _read
    from kn_steer.ab.stats import experiment_stats

    unpaired = experiment_stats("exp1", list(_read(log.path).requests.values()), paired=False)
    assert next(s for s in unpaired.arms if s.arm == "treat").vs_control.p_value > t.p_value
