"""vLLM general plugin (entry point ``vllm.general_plugins``): loaded in every vLLM process.

``register()`` only patches class/module attributes, each when its vLLM module is imported (now,
or later through a post-import hook), so a process pays for none of the modules it does not use:

* ``EngineArgs.create_engine_config``: validate the model and the neuron-set folder at start-up
  (clear error for an unsupported architecture or a mismatched set) and add
  ``additional_config["kn_steer"]`` so vLLM's compile caches never reuse a graph traced without
  the masks (the key is part of the compile hash), and the slot count reaches every worker.
* front end (:mod:`.frontend`), worker (:mod:`.worker`), API server (:mod:`.api`).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from typing import Any, Callable

from kn_steer.serving.context import disabled, load_context, num_slots
from kn_steer.serving.wire import WIRE_VERSION

logger = logging.getLogger("kn_steer.serving")
_PATCHED = "_kn_steer_patched"
_pending: dict[str, list[Callable[[Any], None]]] = {}
_lock = threading.RLock()
_registered = False
_extensions_installed = False
EXTENSIONS_GROUP = "kn_steer.serving_extensions"


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs registered callbacks right after a watched module finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):  # on this module's own loader instance only
            original_exec(module)
            _run_callbacks(fullname, module)

        loader.exec_module = exec_module
        return spec


_finder = _PostImportFinder()


def _run_callbacks(name: str, module: Any) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
    for callback in callbacks:
        callback(module)


def when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """Call ``callback(module)`` now if ``name`` is imported, else right after it is."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback(module)


# ----- engine config ------------------------------------------------------------------------------
def _wrap_create_engine_config(orig):
    def create_engine_config(self, *args, **kwargs):
        if not isinstance(self.additional_config, dict):
            return orig(self, *args, **kwargs)
        extra = dict(self.additional_config)
        mark = dict(extra.get("kn_steer") or {})
        mark["version"] = WIRE_VERSION
        extra["kn_steer"] = mark
        self.additional_config = extra
        config = orig(self, *args, **kwargs)
        model_config = config.model_config
        load_context(model_config.model, model_config.hf_config)  # start-up validation
        slots = num_slots(config.scheduler_config.max_num_seqs)
        if isinstance(config.additional_config, dict):
            config.additional_config["kn_steer"] = {**mark, "slots": slots}
        _install_extensions()
        return config

    setattr(create_engine_config, _PATCHED, True)
    return create_engine_config


def _patch_arg_utils(module: Any) -> None:
    cls = module.EngineArgs
    current = cls.__dict__.get("create_engine_config")
    if current is not None and not getattr(current, _PATCHED, False):
        cls.create_engine_config = _wrap_create_engine_config(current)


def _install_extensions() -> None:
    """Load the serving extensions (entry-point group ``kn_steer.serving_extensions``; the A/B
    layer is one): each is a callable run once in the API-server process, before the app is
    built, that registers itself through :mod:`kn_steer.serving.hooks`. Serving never imports
    them by name."""
    global _extensions_installed
    if _extensions_installed:
        return
    _extensions_installed = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=EXTENSIONS_GROUP):
        ep.load()()


def register() -> None:
    """Entry point: idempotent; does nothing when ``KN_STEER_DISABLE=1``."""
    global _registered
    with _lock:
        if _registered or disabled():
            return
        _registered = True
    from kn_steer.serving import api, frontend, worker

    when_imported("vllm.engine.arg_utils", _patch_arg_utils)
    when_imported("vllm.v1.engine.input_processor", frontend.patch_input_processor)
    when_imported("vllm.v1.worker.gpu_model_runner", worker.patch_gpu_runner)
    when_imported("vllm.v1.worker.cpu_model_runner", worker.patch_cpu_runner)
    when_imported(
        "vllm.entrypoints.openai.completion.protocol",
        lambda m: frontend.patch_protocol(m, "CompletionRequest"),
    )
    when_imported(
        "vllm.entrypoints.openai.chat_completion.protocol",
        lambda m: frontend.patch_protocol(m, "ChatCompletionRequest"),
    )
    when_imported("vllm.entrypoints.openai.completion.serving", api.patch_completion_serving)
    when_imported("vllm.entrypoints.openai.chat_completion.serving", api.patch_chat_serving)
    when_imported("vllm.entrypoints.launchers.app", api.patch_app_module)
