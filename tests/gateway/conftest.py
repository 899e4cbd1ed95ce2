"""Fixtures for the gateway's process-level tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import GatewayProcess


@pytest.fixture
def procs() -> Iterator[list[GatewayProcess]]:
    """A list to append started gateway processes to; all are stopped after the test."""
    started: list[GatewayProcess] = []
    yield started
    for p in started:
        p.stop()
