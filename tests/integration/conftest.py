"""Fixtures of the integration tests: the shared server (one per pytest process) and its client."""

from __future__ import annotations

import pytest

from helpers.engines import server


@pytest.fixture(scope="module")
def srv():
    """The shared ``kn-steer serve`` of :func:`helpers.engines.server` (a module may override it)."""
    return server()


@pytest.fixture(scope="module")
def client(srv):
    """The official ``openai`` client of ``srv``."""
    return srv.client()
