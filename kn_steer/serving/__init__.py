"""The vLLM plugin: per-request MLP-neuron masks in mixed batches.

With kn-steer installed, ``vllm serve MODEL`` (and ``vllm.LLM``) load :func:`plugin.register`
through the ``vllm.general_plugins`` entry point; ``kn-steer serve`` is a thin wrapper.

Request interface (``/v1/completions``, ``/v1/chat/completions``)::

    {"kn_steer": {"interventions": [
        {"set": "NAME" | "neurons": [[layer, index], ...], "op": "scale" | "clamp",
         "factor": F, "value": V, "layers": [...], "positions": "all" | "prompt" | "generated"}]}}

or the same object as a JSON string in ``vllm_xargs={"kn_steer": "..."}``, or offline
``SamplingParams(extra_args={"kn_steer": {...}})``. Composition: scales multiply, a clamp wins
(the last clamp listed). Responses carry ``"kn_steer": {"applied": [...], "neurons": {...}}``
(streaming: on the first chunk). ``GET /v1/kn_steer/sets`` lists the neuron-set registry.

Flow: API edge (``to_sampling_params``: parse, resolve A/B experiment, compile, HTTP 400 on any
problem) -> ``InputProcessor.process_inputs`` (compile again from a cache, attach the compiled
masks to ``extra_args``, salt the prefix cache) -> engine -> worker (``_prepare_inputs``: map each
token to a mask slot; pre-hooks on every ``down_proj`` apply ``h * mul[slot] + add[slot]``).

Modules: :mod:`.context` (settings, registry), :mod:`.frontend` (validation/compilation),
:mod:`.mask_bank` (slots), :mod:`.worker` (model runner hooks), :mod:`.api` (responses, routes,
request records), :mod:`.hooks` (A/B extension points), :mod:`.plugin` (registration),
:mod:`.cli` (``kn-steer serve``).
"""
