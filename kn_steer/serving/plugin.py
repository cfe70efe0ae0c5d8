"""vLLM general plugin (entry point ``vllm.general_plugins``): loaded in every vLLM process.

``register()`` checks the installed vLLM version, selects the V1 model runner (see
:mod:`.engine_config`), and applies every patch of :mod:`.vllm_contract` when its vLLM module is
imported (now, or later through a post-import hook). This module imports nothing heavy: vLLM logs
and skips a plugin whose import fails, so every check lives inside ``register()``, whose errors
stop vLLM.
"""

from __future__ import annotations

import logging
import threading

from kn_steer.serving import vllm_contract
from kn_steer.serving.imports import when_imported

logger = logging.getLogger("kn_steer.serving")
_lock = threading.Lock()
_registered = False


def register() -> None:
    """Entry point: idempotent; does nothing when ``KN_STEER_DISABLE=1``."""
    global _registered
    from kn_steer.serving.settings import disabled

    with _lock:
        if _registered or disabled():
            return
        _registered = True
    version = vllm_contract.check_version()
    logger.debug("kn-steer: registering with %s", version)
    from kn_steer.serving.engine_config import select_runner

    select_runner()
    for name in vllm_contract.modules():
        when_imported(name, lambda module, name=name: vllm_contract.apply_module(name, module))
