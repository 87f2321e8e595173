"""Create-once writes on stores that may ignore conditional writes.

    created, content = create_once(backend, "models/m/versions/1/manifest.json", data,
                                   claims_prefix="models/m/claims/1/", config=cfg)
    if not created and content != data: ...  # someone else published this version first

Some S3-compatible servers silently ignore `If-None-Match`, so "check, then write" alone lets two
racing publishers both believe they won (A checks, B checks, A writes, A reads back, B writes).
The protocol here needs only read-after-write consistent PUT, GET, LIST and DELETE:

1. if an object is at `key`, stop: return it;
2. write a claim object with a unique name under `claims_prefix`;
3. list the claims. Only a writer that sees no other live claim may write `key` (with
   `If-None-Match: *`, which servers that honour it turn into a hard guarantee), read it back and
   compare. A writer that sees an older claim deletes its own and starts again after a random
   pause; the oldest claim waits for younger ones to withdraw;
4. delete the claim (only after `key` was written).

Two writers cannot both see only their own claim: the later one's LIST follows the earlier one's
PUT of its claim, which stays until `key` is written, and step 1 is repeated after winning.
A claim older than `claim_ttl_s` (compared on the store's own clock) belongs to a crashed
writer and is ignored; a winner that took longer than half the TTL to get there starts over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import uuid

from flashio.errors import RegistryError
from flashio.registry.backend import Backend, ObjectInfo
from flashio.registry.config import RegistryConfig
from flashio.registry.errors import TransferError

log = logging.getLogger(__name__)

_ALONE, _OLDEST, _YOUNGER = "alone", "oldest", "younger"


def _standing(backend: Backend, claims_prefix: str, mine: str, ttl_s: float) -> tuple[str, list[ObjectInfo]]:
    claims = list(backend.list(claims_prefix))
    me = next((c for c in claims if c.key == mine), None)
    if me is None:
        raise TransferError(
            f"the publish claim {mine} is missing right after it was written to {backend.description}: "
            f"the store is not read-after-write consistent, which the registry needs"
        )
    live = [c for c in claims if c.key != mine and c.modified_s >= me.modified_s - ttl_s]
    if not live:
        return _ALONE, live
    if all((c.modified_s, c.key) > (me.modified_s, me.key) for c in live):
        return _OLDEST, live
    return _YOUNGER, live


def create_once(backend: Backend, key: str, data: bytes, *, claims_prefix: str,
                config: RegistryConfig) -> tuple[bool, bytes]:
    """Write `data` at `key` unless an object is there. Returns (created, content now at `key`)."""
    ttl_s = config.claim_ttl_s
    deadline = time.monotonic() + config.commit_timeout_s
    body = json.dumps({"key": key, "host": socket.gethostname(), "pid": os.getpid()}).encode()
    rivals: list[ObjectInfo] = []
    for attempt in range(1, 1_000_000):
        existing = backend.get_bytes(key)
        if existing is not None:
            return False, existing
        if time.monotonic() > deadline:
            raise TransferError(
                f"gave up writing {key} on {backend.description} after {config.commit_timeout_s:g}s: another "
                f"publish holds a claim ({', '.join(c.key for c in rivals) or 'unknown'}); if no publish is "
                f"running, that claim expires {ttl_s:g}s after it was made: try again then"
            )
        mine = f"{claims_prefix}{uuid.uuid4().hex}"
        claimed_at = time.monotonic()
        backend.put_bytes(mine, body)
        try:
            standing, rivals = _standing(backend, claims_prefix, mine, ttl_s)
            while standing == _OLDEST and time.monotonic() - claimed_at < ttl_s / 2:
                time.sleep(0.05)  # younger claimants see ours and withdraw
                standing, rivals = _standing(backend, claims_prefix, mine, ttl_s)
            if standing == _ALONE and time.monotonic() - claimed_at < ttl_s / 2:
                if backend.get_bytes(key) is None:
                    backend.put_bytes(key, data, if_absent=True)
                found = backend.get_bytes(key)
                if found is None:
                    raise TransferError(
                        f"wrote {key} to {backend.description} but cannot read it back: the store is not "
                        f"read-after-write consistent, which the registry needs"
                    )
                return found == data, found
        finally:
            _withdraw(backend, mine)
        log.debug("claim on %s lost to %s (attempt %d)", key, [c.key for c in rivals], attempt)
        time.sleep(random.uniform(0.01, min(1.0, 0.02 * 2 ** min(attempt, 6))))
    raise AssertionError("unreachable")  # pragma: no cover


def _withdraw(backend: Backend, claim: str) -> None:
    try:
        backend.delete(claim)
    except RegistryError as exc:  # the claim expires on its own; do not hide the real outcome
        log.warning("could not delete publish claim %s (%s); it expires on its own", claim, exc)
