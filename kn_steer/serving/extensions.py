"""Serving extensions: packages that plug into the serving plugin without it naming them.

An extension is an entry point in the group ``kn_steer.serving_extensions`` (the A/B layer is
``kn_steer.ab:install``): a callable run once, in the process that builds the engine config (the
API server), before the app is built; it registers itself through :mod:`kn_steer.serving.hooks`.
"""

from __future__ import annotations

import threading

EXTENSIONS_GROUP = "kn_steer.serving_extensions"
_lock = threading.Lock()
_extensions_installed = False


def install_extensions() -> None:
    """Run every serving extension once (see the module docstring)."""
    global _extensions_installed
    with _lock:
        if _extensions_installed:
            return
        _extensions_installed = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=EXTENSIONS_GROUP):
        ep.load()()
