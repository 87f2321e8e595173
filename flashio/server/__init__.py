"""An OpenAI-compatible HTTP server for one flashio model (the `serve` extra: starlette, uvicorn).

    from flashio.server import create_app, serve
    serve(session, host="127.0.0.1", port=8000, api_key=None)

`session` is anything with the Session protocol (flashio.server.worker): the model's id, context
length, default GenerationConfig, chat template, prompt encoder and a `stream(prompt_ids, config)`
that yields flashio.generation.StreamedToken.
"""

from __future__ import annotations

from flashio.errors import MissingExtraError
from flashio.server.worker import ModelWorker, PromptEncoder, QueueFullError, Session

try:
    from flashio.server.app import create_app
except ModuleNotFoundError as exc:  # starlette missing: say which extra brings it
    if exc.name not in ("starlette", "anyio"):
        raise
    _missing = exc.name

    def create_app(*args, **kwargs):  # type: ignore[no-redef]
        raise MissingExtraError("flashio serve", "serve", _missing)

__all__ = ["ModelWorker", "PromptEncoder", "QueueFullError", "Session", "create_app", "serve"]


def serve(session: Session, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 8, log_level: str = "info") -> None:
    """Serve `session` until interrupted (blocks)."""
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise MissingExtraError("flashio serve", "serve", exc.name) from None
    uvicorn.run(create_app(session, api_key=api_key, max_waiting=max_waiting), host=host, port=port,
                log_level=log_level)
