"""Shared fixtures: the real default model (prepared once) and tiny random models per family."""

from __future__ import annotations

import pytest

from helpers.tiny import TINY_CONFIGS, build_tiny_model


@pytest.fixture(scope="session")
def default_ref():
    from kn_steer.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def default_hf(default_ref):
    from kn_steer.models import load_hf_model

    return load_hf_model(default_ref)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return build_tiny_model(request.param)


def pytest_sessionfinish(session, exitstatus):
    import sys

    helpers = sys.modules.get("helpers.engines")
    if helpers is not None:
        helpers.close_shared()
