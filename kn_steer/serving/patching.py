"""How the plugin changes a vLLM class or module: wrap an attribute that must exist, idempotently.

A missing attribute is a start-up error naming it (a vLLM release that renamed a method must
never leave kn-steer silently unpatched). Each wrapper factory takes the original callable and
returns the replacement; the replacement is marked so a second registration does nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from kn_steer.errors import KnSteerError

PATCHED = "_kn_steer_patched"


class ContractError(KnSteerError):
    """The installed vLLM lacks something kn-steer relies on."""


def resolve(owner: Any, path: str, where: str) -> tuple[Any, str, Any]:
    """(object holding the last attribute, its name, its current value) for ``A.b`` paths."""
    obj = owner
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            missing = ".".join(parts[: i + 1])
            raise ContractError(
                f"kn-steer cannot start: {where}.{missing} does not exist in the installed vLLM "
                f"(kn-steer relies on it; see kn_steer/serving/vllm_contract.py for the supported vLLM versions)"
            )
        if i < len(parts) - 1:
            obj = getattr(obj, part)
    return obj, parts[-1], getattr(obj, parts[-1])


def patch_method(owner: Any, name: str, factory: Callable[[Callable[..., Any]], Callable[..., Any]],
                 where: str | None = None) -> None:
    """Replace ``owner.name`` by ``factory(original)`` (once)."""
    holder, attr, current = resolve(owner, name, where or getattr(owner, "__name__", str(owner)))
    if getattr(current, PATCHED, False):
        return
    replacement = factory(current)
    if callable(current) and not isinstance(current, type):
        functools.update_wrapper(replacement, current)
    setattr(replacement, PATCHED, True)
    setattr(holder, attr, replacement)


def add_attribute(owner: Any, name: str, value: Any) -> None:
    """Add a new attribute (refuses to shadow one vLLM already defines with another meaning)."""
    current = getattr(owner, name, None)
    if current is None:
        setattr(owner, name, value)
    elif current is not value:
        raise ContractError(f"kn-steer cannot start: {owner.__name__}.{name} already exists in the installed vLLM")


def require(obj: Any, names: tuple[str, ...], where: str) -> None:
    """Instance attributes read at run time: a missing one is a start-up error naming it."""
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise ContractError(
            f"kn-steer cannot start: {where} has no {', '.join(missing)} in the installed vLLM "
            f"(see kn_steer/serving/vllm_contract.py)"
        )
