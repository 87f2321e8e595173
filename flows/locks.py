"""One conversion of a model at a time, through Prefect's global concurrency limits.

    with conversion_lock("opt-125m"):      # waits while another conversion of opt-125m runs
        ...

The limit `flashio-convert-<name>` lives on the Prefect server, so it holds across processes,
machines, workers and `flashio schedule`: a scheduled run that fires while a manual conversion of
the same model is still running waits for it (and then, with `skip_published`, usually finds the
artifact already published). It is created with one slot the first time a model is converted;
an operator may change it (`prefect gcl update flashio-convert-<name> --limit 0` pauses that
model's conversions) and it is then left as it is.

The slot is a lease renewed in the background. A conversion that cannot renew it (the server
unreachable for minutes) stops rather than risk running next to another; one that crashed
(killed, out of memory) holds it until the lease expires, LEASE_S at most. The server keeps
leases in memory unless told otherwise: run it with
PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
(infra/compose.yaml does) so that a server restart does not forget a held slot.

Without a Prefect server (no PREFECT_API_URL: a plain `flashio convert` on a temporary local
server) there is nothing to share the limit with and the lock is skipped: a temporary server
that dies with a killed conversion would otherwise leave the slot held for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

LIMIT_PREFIX = "flashio-convert-"
# Seconds a slot survives without renewal, renewed at 75%: a crashed holder blocks the model this
# long at most, and the server may be unreachable for about a quarter of it.
LEASE_S = 300.0


def limit_name(model_name: str) -> str:
    return f"{LIMIT_PREFIX}{model_name}"


def ensure_limit(name: str, *, slots: int = 1) -> None:
    """Create the global concurrency limit `name` with `slots` slots unless it exists (an
    existing limit is left as the operator set it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # created by a concurrent conversion since we looked
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


@contextmanager
def conversion_lock(model_name: str, *, timeout_s: float | None = None) -> Iterator[None]:
    """Hold the one conversion slot of `model_name` on the Prefect server (nothing without one);
    raises TimeoutError after `timeout_s` (None: wait as long as it takes)."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        yield
        return
    name = limit_name(model_name)
    ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S, strict=True):
        yield
