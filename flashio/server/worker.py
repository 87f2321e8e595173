"""One model session behind a bounded queue, run by one worker thread.

A FlashModel is single-session (one KV cache, one set of window caches), so requests take turns:
the worker thread runs one generation at a time while the event loop keeps serving HTTP. Up to
`max_waiting` requests wait their turn; past that, `submit` refuses at once (the app answers 429).
A request whose client went away is cancelled: the worker drops it at its next token and moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

from flashio.chat_template import ChatTemplate
from flashio.errors import FlashError
from flashio.generation import GenerationConfig, StreamedToken

log = logging.getLogger(__name__)


class PromptEncoder(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...


class Session(Protocol):
    """What the server needs of a model (phase 2: FlashModel behind a small adapter)."""

    model_id: str  # the name /v1/models lists and requests give as "model"
    context_tokens: int  # prompt + output must fit
    defaults: GenerationConfig  # from the artifact's generation_config.json
    chat_template: ChatTemplate | None  # None: /v1/chat/completions answers 400
    tokenizer: PromptEncoder

    def stream(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[StreamedToken]: ...


class QueueFullError(FlashError):
    """Every slot of the server's queue is taken."""


_END = object()


class Job:
    """One request's generation: tokens flow from the worker thread to the request's event loop."""

    def __init__(self, prompt_ids: Sequence[int], config: GenerationConfig, loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.config, self.loop = list(prompt_ids), config, loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.started = threading.Event()

    def cancel(self) -> None:
        """The client went away: the worker stops this job at its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the request's loop is closed: nobody is listening
            self.loop.call_soon_threadsafe(self._events.put_nowait, item)

    async def tokens(self) -> AsyncIterator[StreamedToken]:
        """The generated tokens as they come; raises what the session raised."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield StreamedToken(*item)


class ModelWorker:
    """Runs a Session's generations one at a time on one thread; at most 1 + max_waiting admitted."""

    def __init__(self, session: Session, *, max_waiting: int = 8):
        if max_waiting < 0:
            raise FlashError(f"max_waiting={max_waiting}: expected a queue length >= 0")
        self.session, self.max_waiting = session, max_waiting
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._thread = threading.Thread(target=self._run, name="flashio-model", daemon=True)
        self._thread.start()

    @property
    def admitted(self) -> int:
        with self._lock:
            return self._admitted

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Job:
        """Queue a generation; raises QueueFullError when 1 + max_waiting are already admitted."""
        job = Job(prompt_ids, config, asyncio.get_running_loop())
        with self._lock:
            if self._admitted >= 1 + self.max_waiting:
                raise QueueFullError(f"the model is busy: 1 request running and {self.max_waiting} waiting "
                                     "(the queue's bound); retry later")
            self._admitted += 1
        self._jobs.put(job)
        return job

    def close(self, timeout_s: float = 5.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.started.set()
                if not job.cancelled:
                    self._generate(job)
                job._put(_END)
            except Exception as exc:  # handed to the request, which answers with an error body
                log.exception("generation failed")
                job._put(exc)
            finally:
                with self._lock:
                    self._admitted -= 1

    def _generate(self, job: Job) -> None:
        tokens = iter(self.session.stream(job.prompt_ids, job.config))
        try:
            for tok in tokens:
                if job.cancelled:  # the client left: free the slot now, not after max_tokens
                    log.info("request cancelled by its client; generation stopped")
                    return
                job._put(tuple(tok))
        finally:
            close = getattr(tokens, "close", None)  # a generator: release the model's session now
            if close is not None:
                close()
