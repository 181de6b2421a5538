"""What a request must pass before the server queues it: the Host allow-list (421), the API key (401), JSON
bodies only (415), the body and text limits (413), the JSON itself (400) and the request schemas (422).

Errors are `ApiError`s, answered as JSON in OpenAI's shape, {"error": {"message", "type", "code"}}, by the
exception handlers here (`api_error`, `http_error`, `internal_error`).
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_ft.errors import UserError

if TYPE_CHECKING:
    from qwen_ft.inference.serve import Limits

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, e.status, e.headers)


async def api_error(request: Request, e: ApiError):
    return error_response(e)


async def http_error(request: Request, e: StarletteHTTPException):
    return error_response(ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else
                                   "invalid_request_error"))


async def internal_error(request: Request, e: Exception):
    log.exception("internal error on %s", request.url.path)
    return error_response(ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))


# ----------------------------------------------------------------------------- before any route

def host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def refusal(request: Request, allowed: set[str] | None, cors_origins: tuple[str, ...],
            api_key: str | None) -> ApiError | None:
    """Why this request is refused before any route sees it (None: it is not). `allowed`: the Host names
    served (None: any)."""
    if allowed is not None and host_name(request.headers.get("host", "")) not in allowed:
        return ApiError(421, "this server does not answer for that Host name (add it with --allowed-host)",
                        "misdirected_request")
    if request.method == "OPTIONS" and cors_origins:
        return None  # a CORS preflight: the CORS middleware answers it
    if request.url.path != "/health":
        try:
            authorize(request, api_key)
        except ApiError as e:
            return e
    if request.method == "POST":
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return ApiError(415, f"POST bodies must be sent as Content-Type: application/json (got "
                                 f"{kind or 'none'})", "unsupported_media_type")
    return None


def authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error",
                       {"WWW-Authenticate": "Bearer"})


# ----------------------------------------------------------------------------- request bodies

class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | dict | None = None
    texts: list[str | dict] | None = None
    top_k: int = Field(1, ge=1)


class HttpClassifyRequest(BaseModel):
    """semantic-router's `http_classify` request: one text, or a list of texts."""
    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send sampling fields a classifier ignores
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    n: int | None = 1
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def schema_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


async def read_json(request: Request, schema: type[BaseModel], limits: Limits) -> BaseModel:
    """The body as `schema`, read no further than the body limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limits.max_body_bytes} "
                            f"(--max-texts-per-request {limits.max_texts} x --max-chars {limits.max_chars})",
                       "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                           "request_too_large")
    try:
        data = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, schema_message(e)) from None


def to_rows(classifier, items: list, limits: Limits) -> list[dict]:
    """The classifier's rows of a request's texts, each within the limits and readable by the task."""
    if len(items) > limits.max_texts:
        raise ApiError(413, f"{len(items)} texts in one request; the limit is {limits.max_texts} "
                            "(--max-texts-per-request)", "request_too_large")
    rows = []
    for i, item in enumerate(items):
        text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
        size = len(text)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800" would fail inside the tokenizer
            raise ApiError(422, f"text {i} is not valid Unicode (it holds an unpaired surrogate)") from None
        if size > limits.max_chars:
            raise ApiError(413, f"text {i} has {size} characters; the limit is {limits.max_chars} "
                                "(--max-chars)", "request_too_large")
        try:
            rows.append(classifier.row(item))
        except UserError as e:
            raise ApiError(422, f"text {i}: {e.message}") from None
    try:
        classifier.check_rows(rows)
    except UserError as e:
        raise ApiError(422, e.message) from None
    return rows


def last_user_text(req: ChatRequest) -> str:
    """The text to classify: the last user message's content (its text parts, joined by newlines)."""
    user = [m for m in req.messages if m.role == "user"]
    if not user:
        raise ApiError(422, "messages has no user message: the last user message is the text to classify")
    content = user[-1].content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not parts or not all(isinstance(t, str) for t in parts):
            raise ApiError(422, "the last user message has no text part")
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise ApiError(422, "the last user message has no content")
    return content
