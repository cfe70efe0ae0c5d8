"""Shared real-vLLM engines and server for tests (one of each per pytest process).

Engines are slow to start (~30 s, plus a one-off compile of a few minutes that vLLM caches on
disk), so every test that needs the default model served goes through :func:`offline_llm` and
:func:`server`, which build the engine once and keep it for the session. Their configuration is
fixed (same compile-cache key for both), so the compiled graph is reused across runs.

Neuron sets for tests are written to a temporary folder from explicit neuron lists
(:data:`TEST_SETS`); nothing depends on the shipped ``neuron_sets/``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ENGINE_KW: dict[str, Any] = dict(
    dtype="float32", max_model_len=512, max_num_seqs=64, seed=0, enable_prefix_caching=True,
)
KV_CACHE_GIB = "2"
SERVED_NAME = "smollm2-135m"
_state: dict[str, Any] = {}


def _base_env() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----- neuron sets --------------------------------------------------------------------------------
def _neurons(layers, every: int, start: int = 0) -> list[tuple[int, int]]:
    return [(l, i) for l in layers for i in range(start, 1536, every)]


# name -> (neurons, operation): strong enough to change greedy text on the default model
TEST_SETS: dict[str, tuple[list[tuple[int, int]], dict[str, Any]]] = {
    "t-silence": (_neurons(range(30), 5), {"op": "scale", "factor": 0.0}),
    "t-boost": (_neurons(range(4, 12), 11, 3), {"op": "scale", "factor": 3.0}),
    "t-clamp": (_neurons(range(8, 16), 17, 1), {"op": "clamp", "value": 2.0}),
}


def write_test_sets(folder: Path, ref, config, sets=TEST_SETS) -> Path:
    """Neuron-set files for ``ref`` (a ModelRef) in ``folder``."""
    from kn_steer.sets.format import (
        MethodInfo,
        Neuron,
        NeuronSet,
        Operation,
        model_identity,
    )

    folder.mkdir(parents=True, exist_ok=True)
    identity = model_identity(ref, config)
    for name, (neurons, op) in sets.items():
        NeuronSet(
            name=name, description=f"test set {name}", model=identity,
            method=MethodInfo(name="explicit"), operation=Operation(**op),
            neurons=[Neuron(layer=l, index=i) for l, i in neurons],
        ).save(folder / f"{name}.json")
    return folder


def default_ref():
    if "ref" not in _state:
        from transformers import AutoConfig

        from kn_steer.models import resolve_model

        ref = resolve_model("smollm2-135m")
        _state["ref"] = ref
        _state["config"] = AutoConfig.from_pretrained(ref.path)
    return _state["ref"], _state["config"]


def sets_dir() -> Path:
    """A temporary folder with :data:`TEST_SETS` for the default model (made once)."""
    if "sets" not in _state:
        ref, config = default_ref()
        folder = Path(tempfile.mkdtemp(prefix="kn-steer-sets-"))
        atexit.register(shutil.rmtree, folder, True)
        _state["sets"] = write_test_sets(folder, ref, config)
    return _state["sets"]


# name -> spec: a preset of two sets, one at prompt positions only (the sets' presets come free)
TEST_PRESETS: dict[str, Any] = {
    "t-mix": {"interventions": [{"set": "t-boost"}, {"set": "t-clamp", "positions": "prompt"}]},
}


def write_presets(path: Path, presets: dict[str, Any] = TEST_PRESETS) -> Path:
    path.write_text(json.dumps({"presets": presets}))
    return path


def presets_file() -> Path:
    """A presets file with :data:`TEST_PRESETS`, beside the test sets (made once)."""
    if "presets" not in _state:
        _state["presets"] = write_presets(sets_dir().parent / f"{sets_dir().name}-presets.json")
        atexit.register(_state["presets"].unlink, True)
    return _state["presets"]


def registry():
    from kn_steer.sets.format import model_identity
    from kn_steer.sets.registry import NeuronSetRegistry

    ref, config = default_ref()
    return NeuronSetRegistry.load(sets_dir(), model_identity(ref, config))


# ----- offline engine -----------------------------------------------------------------------------
@contextmanager
def sets_env(folder: Path):
    """``KN_STEER_NEURON_SETS`` while an engine is built, restored after: an engine keeps the
    settings it was built with, and later tests (a CLI, another engine) see the old value."""
    saved = os.environ.get("KN_STEER_NEURON_SETS")
    os.environ["KN_STEER_NEURON_SETS"] = str(folder)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KN_STEER_NEURON_SETS", None)
        else:
            os.environ["KN_STEER_NEURON_SETS"] = saved


def offline_llm():
    """The shared ``vllm.LLM`` (default model, float32, default compile mode, prefix caching)."""
    if "llm" not in _state:
        _base_env()
        from vllm import LLM

        ref, _ = default_ref()
        started = time.time()
        with sets_env(sets_dir()):
            _state["llm"] = LLM(model=str(ref.path), **ENGINE_KW)
        _state["llm_start_s"] = time.time() - started
    return _state["llm"]


def make_llm(model: str | Path, sets: Path | None = None, **kw):
    """A separate engine (caller shuts it down with :func:`shutdown`)."""
    _base_env()
    from vllm import LLM

    with sets_env(sets or sets_dir()):
        return LLM(model=str(model), **kw)


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass


# ----- HTTP server --------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, api_key: str | None = None):
        self.proc, self.port, self.log, self.api_key = proc, port, log, api_key
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def headers(self) -> dict[str, str]:
        """What an HTTP request needs to pass the server's ``--api-key`` (nothing without one)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=300)

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.base_url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


SERVER_MAX_NEURONS = 20000


def start_server(sets: Path, extra: list[str] | None = None, timeout: float = 900,
                 max_neurons: int = SERVER_MAX_NEURONS, presets: Path | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = None) -> Server:
    """``kn-steer serve`` in a subprocess (engine settings of :func:`offline_llm`, but eager:
    vLLM's compile cache does not load back on this CPU build, and a compile costs minutes).

    Presets: ``presets``, else ``$KN_STEER_PRESETS``, else :data:`TEST_PRESETS`. ``env``: variables of
    this server only (several may start at once from threads). ``api_key``: vLLM's ``--api-key``."""
    _base_env()
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="kn-steer-server-", suffix=".log")[1])
    presets = presets or Path(os.environ.get("KN_STEER_PRESETS") or presets_file())
    args = [
        sys.executable, "-m", "kn_steer.cli", "serve", "--port", str(port), "--sets", str(sets),
        "--max-neurons", str(max_neurons), "--presets", str(presets), "--", "--enforce-eager",
        "--dtype", ENGINE_KW["dtype"], "--max-model-len", str(ENGINE_KW["max_model_len"]),
        "--max-num-seqs", str(ENGINE_KW["max_num_seqs"]), "--seed", str(ENGINE_KW["seed"]),
        *(["--api-key", api_key] if api_key else []), *(extra or []),
    ]
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(proc, port, log, api_key)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
        if server.healthy():
            return server
        time.sleep(2)
    server.stop()
    raise RuntimeError(f"server did not start in {timeout} s:\n{log.read_text()[-5000:]}")


def server() -> Server:
    """The shared server on the default model with :data:`TEST_SETS`."""
    if "server" not in _state:
        started = time.time()
        srv = start_server(sets_dir())
        atexit.register(srv.stop)
        _state["server"] = srv
        _state["server_start_s"] = time.time() - started
    return _state["server"]


def close_shared() -> None:
    """Shut the shared offline engine down (pytest_sessionfinish): at interpreter exit vLLM's
    shutdown logging would write to pytest's already closed capture streams."""
    llm = _state.pop("llm", None)
    if llm is not None:
        shutdown(llm)


def greedy(max_tokens: int, spec: Any = None, logprobs: int | None = None):
    from vllm import SamplingParams

    extra = {"kn_steer": spec} if spec is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, extra_args=extra)


def dumps(spec: Any) -> str:
    return json.dumps(spec)
