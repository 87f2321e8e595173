"""The `flashio` command.

    flashio run ARTIFACT --prompt "def main():" --max-new-tokens 32
    flashio inspect ARTIFACT --verify
    flashio pack CHECKPOINT_DIR OUT_DIR --dtype float16
    flashio chat ARTIFACT --system "Be brief."
    flashio serve ARTIFACT --port 8000          # OpenAI-compatible (the serve extra)

Runtime subcommands live in flashio. Pipeline subcommands (convert, schedule...) are contributed by
the `flows` package through the `flashio.commands` entry-point group; each entry point is a
function `add_command(subparsers)` that must not import the pipeline's heavy dependencies at
import time, so that `flashio --help` works on a runtime-only install.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from importlib import metadata

from flashio.errors import FlashError, MissingExtraError

log = logging.getLogger(__name__)

# oneDNN, behind torch's bf16 CPU matmuls, caches a primitive (~1 MB) per matmul shape in two
# caches of 1024 entries; the attention's shapes change with every token, so at 7B scale the
# caches grew by ~5 MB per token, towards ~1 GB outside any DRAM budget. The command bounds them
# (read when oneDNN first runs) unless the user set them; applications that import flashio set
# them themselves (README, "Using flashio in an application"): the library changes no environment.
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}

# Modules inside flashio that contribute subcommands: each has `add_commands(subparsers)`.
_RUNTIME_COMMAND_MODULES = (
    "flashio.commands",
    "flashio.registry.cli",
    "flashio.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashio",
        description="Run LLMs whose FFN weights stay on flash (LLM in a flash), and build their artifacts.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in _RUNTIME_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that part is not in this build
                continue
            raise
        module.add_commands(sub)
    for ep in _entry_points():
        if ep.name in sub.choices:  # stale metadata of an older install (e.g. the Prefect `serve`, now `schedule`)
            log.debug("entry point %s (%s) skipped: a built-in command has that name", ep.name, ep.value)
            continue
        try:
            add_command: Callable = ep.load()
        except ImportError as exc:
            _add_unavailable(sub, ep.name, exc)
            continue
        add_command(sub)
    return parser


def _entry_points():
    try:
        return sorted(metadata.entry_points(group="flashio.commands"), key=lambda e: e.name)
    except Exception:  # pragma: no cover - broken metadata must not break the runtime CLI
        log.debug("could not read flashio.commands entry points", exc_info=True)
        return []


def _add_unavailable(sub, name: str, exc: ImportError) -> None:
    """A contributed command whose module cannot be imported: keep it, explain on use."""
    p = sub.add_parser(name, help="(unavailable: needs the pipeline extra)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def _fail(_args):
        raise MissingExtraError(f"`flashio {name}`", "pipeline", getattr(exc, "name", None))

    p.set_defaults(func=_fail)


# how long a SIGTERM's exception may take to end the command before the process ends itself: code
# that catches every exception can swallow the SystemExit on its way (once, a test's stopped
# conversion ran on to publish and exit 0; where it was caught is not known)
TERM_GRACE_S = 20.0
_term: dict = {"signum": None, "left": threading.Event()}


def _terminated(signum: int, _frame) -> None:
    if _term["signum"] is None:
        _term["signum"] = signum
        threading.Thread(target=_end_if_still_running, args=(signum,), name="flashio-sigterm", daemon=True).start()
    raise SystemExit(128 + signum)  # the status a shell gives a process a signal ended


def _end_if_still_running(signum: int) -> None:
    """The SIGTERM's last resort: unless the command has left within TERM_GRACE_S, run the atexit
    handlers (the temporary Prefect server's stop) and end the process with the signal's status."""
    if _term["left"].wait(TERM_GRACE_S):
        return
    print(f"flashio: still running {TERM_GRACE_S:g} s after SIGTERM (its exception was caught somewhere): "
          "ending the process", file=sys.stderr, flush=True)
    try:
        atexit._run_exitfuncs()
    finally:
        os._exit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits():
    """While a command runs, SIGTERM (kill, a container or service manager stopping it) ends the
    process as an exception would: `finally` blocks and atexit handlers run, so the temporary
    Prefect server a conversion started, reader threads and temporary files go with it (by
    default SIGTERM ends Python at once and left the server running). Where the exception is
    swallowed on its way, the command still ends with the signal's status: at its end if it gets
    there, else after TERM_GRACE_S (_end_if_still_running). Only where SIGTERM still has its
    default action, in the main thread; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    _term["signum"] = None
    _term["left"].clear()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
        if _term["signum"] is not None:  # the command ran on past a swallowed SIGTERM
            raise SystemExit(128 + _term["signum"])
    finally:
        signal.signal(signal.SIGTERM, previous)
        _term["left"].set()


def main(argv: list[str] | None = None) -> int:
    for key, value in ONEDNN_CACHE_ENV.items():  # this process is the command's: before any matmul
        os.environ.setdefault(key, value)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _sigterm_exits():
            rc = args.func(args)
    except FlashError as exc:
        print(f"flashio {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashio {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
