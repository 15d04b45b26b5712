"""Fixtures of the reliability suite (helpers live in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import MlflowServer, free_port, small_spec


@pytest.fixture
def small(tmp_path):
    """Factory of small run-spec dicts under ``tmp_path`` (see helpers.small_spec)."""
    return lambda **sections: small_spec(tmp_path, **sections)


@pytest.fixture
def mlflow_server(tmp_path):
    """Factory: a started server on a free port over ``tmp_path/server.db``; killed at teardown."""
    servers = []

    def start(db: Path | None = None, port: int | None = None) -> MlflowServer:
        from study.tracking import prepare

        db = db or tmp_path / "server.db"
        prepare(f"sqlite:///{db}", "tests")  # the store is created once, by one process
        server = MlflowServer(f"sqlite:///{db}", port or free_port(), tmp_path / "server.log")
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.kill()
