"""The OpenAI-compatible HTTP app (Starlette) over one model session.

    app = create_app(session, api_key=None, max_waiting=8)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events ending in `data: [DONE]`, or one JSON body with usage counts), GET /health.
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flashio.errors import FlashError
from flashio.server import protocol
from flashio.server.protocol import GenerationRequest, RequestError, error_body
from flashio.server.worker import Job, ModelWorker, QueueFullError, Session

log = logging.getLogger(__name__)


def create_app(session: Session, *, api_key: str | None = None, max_waiting: int = 8,
               retry_after_s: int = 1) -> Starlette:
    """The app; its model worker thread starts now and stops when the app shuts down."""
    worker = ModelWorker(session, max_waiting=max_waiting)
    created = int(time.time())

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": session.model_id, "object": "model", "created": created, "owned_by": "flashio"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": session.model_id, "admitted": worker.admitted,
                             "max_waiting": worker.max_waiting})

    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    async def _generate(request: Request, kind: str) -> Response:
        try:
            body = await _json_body(request)
            req = protocol.parse_request(body, session, kind=kind)
            job = worker.submit(req.prompt_ids, req.config)
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except QueueFullError as exc:
            return JSONResponse(error_body(str(exc), type="rate_limit_error", code="queue_full"), status_code=429,
                                headers={"Retry-After": str(retry_after_s)})
        rid = protocol.new_id(kind)
        if req.stream:
            return _CancellingStream(job, _sse(job, req, rid, session.model_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _whole(request, job, req, rid, session.model_id)
        finally:
            job.cancel()  # no-op when it finished; frees the slot when the client left or an error came

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        worker.close()

    routes = [Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, middleware=[Middleware(_ApiKey, api_key=api_key)],
                    exception_handlers={404: _not_found, 405: _not_allowed}, lifespan=lifespan)
    app.state.worker = worker
    return app


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc}); send a JSON object with "
                           "Content-Type: application/json", code="invalid_json") from None


async def _whole(request: Request, job: Job, req: GenerationRequest, rid: str, model: str) -> Response:
    pieces, n_out, finish = [], 0, "length"
    try:
        async for tok in job.tokens():
            pieces.append(tok.text)
            n_out += 1
            finish = tok.finish_reason or finish
            if await request.is_disconnected():
                log.info("%s: client disconnected; cancelling", rid)
                return Response(status_code=499)
    except Exception as exc:  # the session failed (logged by the worker): an error body, the server goes on
        return JSONResponse(error_body(_failure(exc), type="server_error", code="generation_failed"), status_code=500)
    return JSONResponse(protocol.response(req.kind, rid, model, "".join(pieces), finish, len(req.prompt_ids), n_out))


async def _sse(job: Job, req: GenerationRequest, rid: str, model: str) -> AsyncIterator[bytes]:
    kind = req.kind
    n_out, finish = 0, "length"
    if kind == "chat":
        yield _event(protocol.chunk(kind, rid, model, role=True))
    try:
        async for tok in job.tokens():
            n_out += 1
            if tok.finish_reason is not None:
                finish = tok.finish_reason
            if tok.text:
                yield _event(protocol.chunk(kind, rid, model, text=tok.text))
    except Exception as exc:  # headers are sent: the error travels as an event, as OpenAI's API does
        yield _event(error_body(_failure(exc), type="server_error", code="generation_failed"))
        yield b"data: [DONE]\n\n"
        return
    yield _event(protocol.chunk(kind, rid, model, finish_reason=finish))
    if req.include_usage:
        yield _event(protocol.chunk(kind, rid, model, usage_counts=protocol.usage(len(req.prompt_ids), n_out)))
    yield b"data: [DONE]\n\n"


def _failure(exc: Exception) -> str:
    what = str(exc) if isinstance(exc, FlashError) else f"{type(exc).__name__}: {exc}"
    return f"generation failed: {what}"


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


class _CancellingStream(StreamingResponse):
    """A streaming response that cancels its job however it ends (done, client gone, error), so the
    worker drops the generation at its next token."""

    def __init__(self, job: Job, content: AsyncIterator[bytes], **kw: Any):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class _ApiKey:
    """Bearer-token check on /v1/ routes when an API key is set (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            reason = "no API key given" if not given else "the API key is not valid"
            body = error_body(f"{reason}: send 'Authorization: Bearer <key>' with the key the server was started "
                              "with (--api-key)", type="invalid_request_error", code="invalid_api_key")
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"no route {request.url.path}; this server has /v1/models, /v1/completions, "
                                   "/v1/chat/completions", type="invalid_request_error", code="not_found"),
                        status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}",
                                   type="invalid_request_error", code="method_not_allowed"), status_code=405)
