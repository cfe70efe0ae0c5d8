"""The vLLM plugin: per-request interventions on MLP neurons, in mixed batches, proven at start-up.

With kn-steer installed, ``vllm serve MODEL`` (and ``vllm.LLM``) load :func:`plugin.register`
through the ``vllm.general_plugins`` entry point; ``kn-steer serve`` is a thin wrapper.

A request spec crosses these modules, top to bottom:

* :mod:`.endpoints` (ASGI middleware: ``kn_steer`` only where it is applied, bounded bodies) ->
  :mod:`.api` (compile off the event loop, the response's report, records, metrics) ->
  :mod:`.edge` (parse, A/B arm, :mod:`kn_steer.steering.compile` with the server's limits, HTTP 400
  on any problem; attach the masks in :mod:`.wire` format, salt the prefix cache) ->
  :mod:`.admission` (the scheduler never runs more distinct masks than the bank holds) ->
  :mod:`.runner_v1` (per step: :mod:`.mapping` token -> slot, :mod:`.slots` slot table) ->
  :mod:`.ops.neuron_mask` (the layer math, in the compiled graph).

Start-up: :mod:`.plugin` applies :mod:`.vllm_contract` (every vLLM internal touched),
:mod:`.engine_config` refuses what cannot be steered and sizes the bank, :mod:`.selfcheck` proves
the masks reach the compiled forward in every worker, :mod:`.api` asks every worker for that proof
before the server answers. Settings: :mod:`.settings`; per-process model context: :mod:`.context`;
extension points for the A/B layer: :mod:`.hooks`.
"""


def __getattr__(name: str):
    if name == "verify_engine":  # lazily: the plugin entry point imports this package
        from kn_steer.serving.api import verify_engine

        return verify_engine
    raise AttributeError(name)
