"""What every route of the simulated server shares: the engine, the settings and the checks SGLang makes.

`SimServer` is handed to the route modules (openai_routes, native_routes),
which register their handlers on the app through `route`. The handlers are
plain Starlette endpoints (no FastAPI dependency solving: this is the
per-request hot path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from model_server.sim.engine import SimEngine
from model_server.sim.faults import ReplyFault
from model_server.sim.protocol import JSON_TYPE, BadRequest, json_response, openai_error
from model_server.sim.settings import SimSettings
from model_server.sim.streaming import sse, sse_after_first_chunk

__all__ = ["DEFAULT_MODEL", "SIMULATOR_NOTICE", "SimServer", "UNSUPPORTED_MEDIA_TYPE"]

SIMULATOR_NOTICE = "model-server sim: a simulated SGLang engine; replies are deterministic filler text, not a model's"
DEFAULT_MODEL = "default"  # SGLang's DEFAULT_MODEL_NAME: the model of a request that names none
_MALFORMED = b'{"id": "sim-malformed", "choices": [{"text": "trunc'


def _unsupported_media_type() -> str:
    """SGLang's message for a body that is not application/json (validate_json_request), verbatim."""
    errors = [
        {
            "loc": ["header", "content-type"],
            "msg": "Unsupported Media Type: Only 'application/json' is allowed",
            "type": "value_error",
        }
    ]
    exc = RequestValidationError(errors=errors)
    return f"{exc} {exc.errors()}"


UNSUPPORTED_MEDIA_TYPE = _unsupported_media_type()


class SimServer:
    """The engine and settings of one app, and SGLang's per-request checks."""

    def __init__(self, app: FastAPI, settings: SimSettings, engine: SimEngine) -> None:
        self.app = app
        self.settings = settings
        self.engine = engine

    def route(self, path: str, *methods: str) -> Callable:
        """Register a plain Starlette endpoint."""

        def register(endpoint: Callable) -> Callable:
            self.app.router.add_route(path, endpoint, methods=list(methods), include_in_schema=False)
            return endpoint

        return register

    # --- checks, in SGLang's order ---

    @staticmethod
    def require_json(request: Request) -> None:
        """SGLang's validate_json_request on the OpenAI POST routes (400 unless application/json)."""
        media_type = request.headers.get("content-type", "").lower().split(";", maxsplit=1)[0]
        if media_type != JSON_TYPE:
            raise BadRequest(UNSUPPORTED_MEDIA_TYPE)

    def check_kind(self, wants_embedding: bool, route: str) -> None:
        if wants_embedding == self.settings.is_embedding:
            return
        if self.settings.is_embedding:
            message = (
                f"This server serves an embedding model (--is-embedding); it does not answer {route}. "
                "Like SGLang, model-server sim serves one kind of model per server."
            )
        else:
            message = (
                "This model does not appear to be an embedding model by default. "
                "Please add `--is-embedding` when launching the server or try another model."
            )
        raise BadRequest(message, err_type="BadRequestError")

    @staticmethod
    def model_of(data: dict) -> str:
        """The request's model, echoed back: SGLang accepts any name ("default" when omitted)."""
        model = data.get("model")
        if model is None:
            return DEFAULT_MODEL
        if not isinstance(model, str):
            raise BadRequest(f"model: Input should be a valid string, got {model!r}", param="model")
        return model

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """SGLang's length checks (tokenizer_manager._validate_one_request); the tokens left for the reply."""
        limit = self.settings.effective_context_length
        if prompt_tokens >= limit:
            raise BadRequest(
                f"The input ({prompt_tokens} tokens) is longer than the model's context length ({limit} tokens).",
                err_type="BadRequestError",
            )
        if max_tokens is not None and prompt_tokens + max_tokens > limit:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {limit} tokens. "
                f"You requested a total of {prompt_tokens + max_tokens} tokens: {prompt_tokens} tokens from the "
                f"input messages and {max_tokens} tokens for the completion. Please reduce the number of tokens "
                "in the input messages or the completion to fit within the limit.",
                err_type="BadRequestError",
            )
        return limit - prompt_tokens if max_tokens is None else max_tokens

    # --- faults ---

    async def admit(self, route: str, stream: bool) -> ReplyFault:
        """Count the request and draw its fault; a hang waits here, a crash never returns."""
        fault = self.engine.admit(route, stream=stream)
        if fault is ReplyFault.HANG:
            await self.engine.hang()
            return ReplyFault.PROCEED
        return fault

    def fault_response(self, fault: ReplyFault, stream: bool, *, native: bool = False) -> Response | None:
        """The answer of an injected error (in SGLang's shape for the route) or malformed body."""
        if fault is ReplyFault.ERROR:
            f = self.engine.faults
            message = f"simulated fault: injected error (error_rate={f.error_rate})"
            if native:
                return json_response({"error": {"message": message}}, f.error_status)
            # SGLang answers an aborted request's status with type str(status) (an HTTPException)
            return openai_error(f.error_status, message, err_type="BadRequestError" if f.error_status == 400 else None)
        if fault is ReplyFault.MALFORMED and not stream:
            return Response(_MALFORMED, media_type=JSON_TYPE)
        return None

    async def start_stream(self, body: AsyncIterator[bytes]) -> Response:
        """SGLang sends an OpenAI stream's headers with its first chunk; the hang_before_first_token
        fault sends them at once (an engine that accepted the request, then hung)."""
        if self.engine.faults.hang_before_first_token:
            return sse(body)
        return await sse_after_first_chunk(body)

    def usage_options(self, data: dict) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats), as SGLang's should_include_usage reads them."""
        default = self.settings.stream_response_default_include_usage
        options: Any = data.get("stream_options")
        if not options:
            return default, False
        if not isinstance(options, dict):
            raise BadRequest("stream_options must be an object", param="stream_options")
        return bool(options.get("include_usage")) or default, bool(options.get("continuous_usage_stats"))
