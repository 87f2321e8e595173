"""A session-scoped Prefect test harness for the pipeline's integration tests.

    pytest_plugins = ["tests.integration.prefect_harness"]   # in a test module: registered once

    @pytest.mark.integration
    def test_flow(prefect_session): ...

One temporary Prefect server (SQLite) for the whole session, started on first use (9-17 s on a
2-core machine), with a fresh PREFECT_HOME (results, caches) and the flow heartbeat off (it costs
~1 s per flow run). Hugging Face libraries are kept offline: `datasets` otherwise pings the hub
even for local files. The flashio registry cache goes to a session directory too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "FLASHIO_PROGRESS": "none"}
for _k, _v in OFFLINE_ENV.items():  # before datasets / huggingface_hub read them at import
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def prefect_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary Prefect server and fresh PREFECT_HOME; yields the session's scratch directory."""
    pytest.importorskip("prefect")
    home = tmp_path_factory.mktemp("prefect-home")
    cache = tmp_path_factory.mktemp("flashio-cache")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "FLASHIO_CACHE")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["FLASHIO_CACHE"] = str(cache)
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_HOME,
        PREFECT_LOCAL_STORAGE_PATH,
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    settings = {PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage"),
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.3}
    try:
        with temporary_settings(updates=settings), prefect_test_harness(server_startup_timeout=120):
            yield home
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
