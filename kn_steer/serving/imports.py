"""Run a callback right after a module is imported (or now, if it already is).

The plugin patches vLLM classes when their modules load, so a process pays for none of the
modules it does not use (the API server never imports the worker, and the reverse).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Any, Callable

_pending: dict[str, list[Callable[[Any], None]]] = {}
_lock = threading.RLock()


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
