"""HTTP over a Classifier: FastAPI app factory with dynamic micro-batching. Knows HTTP, not tokens.

Requests are parsed and checked on the event loop (`serve_guard`: schema, limits, key), then queued; one
collector task gathers concurrent requests into one batch (up to `max_batch_size` texts, waiting at most
`max_wait_ms` after the first) and runs it in the single inference thread. While that thread computes,
new requests queue up and form the next batch. The queue is bounded in texts: past `max_queue` the
server answers 503 with Retry-After instead of growing without limit.

Endpoints: POST /v1/classify, GET /v1/labels, POST /v1/chat/completions (OpenAI-compatible: the reply
is the label), GET /v1/models, GET /health (503 until the model is loaded), GET /metrics (Prometheus
text format, `serve_metrics`). Errors are JSON in OpenAI's shape, {"error": {"message", "type", "code"}}.

The handlers are named functions on `router`; what they share (settings, metrics, the batcher) is the app's
`ServeState`, at `app.state.qwen_ft`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_ft.errors import UserError
from qwen_ft.inference.serve_guard import (
    ApiError,
    ChatRequest,
    ClassifyRequest,
    HttpClassifyRequest,
    api_error,
    authorize,
    error_response,
    http_error,
    internal_error,
    last_user_text,
    read_json,
    refusal,
    to_rows,
)
from qwen_ft.inference.serve_metrics import Metrics
from qwen_ft.inference.serve_shapes import chat_completion, chat_stream, label_scores, result

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/classify", "/v1/chat/completions", "/v1/labels", "/v1/models", "/health", "/metrics")


@dataclass
class Limits:
    max_batch_size: int = 32  # texts per forward batch
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # texts waiting or being computed; more -> 503
    max_texts: int = 64  # texts per request
    max_chars: int = 20_000  # characters per text
    decode: str = "auto"
    normalize: str = "auto"
    min_confidence: float | None = None  # abstain below it (else the run's threshold.json, if any)
    fallback_label: str | None = None

    @property
    def max_body_bytes(self) -> int:
        return self.max_texts * (self.max_chars * 4 + 64) + 65_536  # UTF-8 worst case plus JSON syntax


# ----------------------------------------------------------------------------- the batcher

@dataclass
class Pending:
    rows: list[dict]
    top_k: int
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers queued requests into batches and runs them, one at a time, in the inference thread."""

    def __init__(self, limits: Limits, metrics: Metrics):
        self.limits, self.metrics = limits, metrics
        self.queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self.pending_texts = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-ft-infer")
        self.classifier = None
        self.abstain = None  # the classifier's abstention rule (selective.Abstention), set when it loads
        self.load_error: str | None = None
        self.draining = False
        self._carry: Pending | None = None

    def submit(self, rows: list[dict], top_k: int) -> asyncio.Future:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "unavailable", {"Retry-After": "1"})
        if self.pending_texts + len(rows) > self.limits.max_queue:
            raise ApiError(503, f"overloaded: {self.pending_texts} texts queued (limit --max-queue "
                                f"{self.limits.max_queue}); retry shortly", "overloaded", {"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self.pending_texts += len(rows)
        self.queue.put_nowait(Pending(rows, top_k, future))
        return future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry or await self.queue.get()
            self._carry = None
            if first is None:
                return
            batch, n, stop = [first], len(first.rows), False
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while n < self.limits.max_batch_size:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    await asyncio.sleep(min(left, 0.001))  # polled: cancelling a waiting get() can drop an item
                    continue
                if item is None:
                    stop = True
                    break
                if n + len(item.rows) > self.limits.max_batch_size:
                    self._carry = item
                    break
                batch.append(item)
                n += len(item.rows)
            await self._compute(loop, batch)
            if stop:
                return

    async def _compute(self, loop, batch: list[Pending]) -> None:
        rows = [r for p in batch for r in p.rows]
        self.metrics.batch(len(rows))
        try:
            results, _ = await loop.run_in_executor(self.executor, self._classify, rows,
                                                    max(p.top_k for p in batch))
        except Exception as e:
            if len(batch) > 1:  # one bad request must not fail its neighbours: each alone
                for p in batch:
                    await self._compute(loop, [p])
                return
            if isinstance(e, UserError):  # e.g. choices too long for the run's --max-length
                error = ApiError(422, e.message)
            else:
                log.exception("inference failed for a request of %d texts", len(rows))
                error = ApiError(500, "inference failed for this request", "internal_error")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            self.pending_texts -= len(rows)
            return
        start = 0
        for p in batch:
            if not p.future.done():  # a client that went away has a cancelled future
                p.future.set_result(results[start:start + len(p.rows)])
            start += len(p.rows)
        self.pending_texts -= len(rows)

    def _classify(self, rows: list[dict], top_k: int):
        results, stats = self.classifier.classify(rows, decode=self.limits.decode, normalize=self.limits.normalize,
                                                  top_k=top_k, batch_size=self.limits.max_batch_size)
        if self.abstain is not None:
            results = [self.abstain.apply(r) for r in results]
            self.metrics.abstained(sum(r["abstained"] for r in results))
        return results, stats


# ----------------------------------------------------------------------------- the app

@dataclass
class ServeState:
    """What the handlers share (`app.state.qwen_ft`): the settings, the metrics and, from startup, the batcher."""

    load: Callable[[], object]
    limits: Limits
    metrics: Metrics
    api_key: str | None = None
    model_name: str = "qwen-ft"
    on_load_error: Callable[[str], None] | None = None
    allowed: set[str] | None = None  # Host names served (None: any)
    cors_origins: tuple[str, ...] = ()
    batcher: Batcher | None = None


def create_app(load: Callable[[], object], *, limits: Limits | None = None, api_key: str | None = None,
               model_name: str = "qwen-ft", on_load_error: Callable[[str], None] | None = None,
               allowed_hosts: tuple[str, ...] | None = None, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """An app over the classifier that `load()` returns; it is called in the inference thread at startup,
    and /health answers 503 until it returns. `allowed_hosts`: the Host names served (others get 421: a web
    page that rebinds its own name to this address cannot read answers); None serves any. With `api_key`
    every route but /health needs it; no CORS headers unless `cors_origins` names the origins."""
    app = FastAPI(title="qwen-ft classifier", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.qwen_ft = ServeState(
        load, limits or Limits(), Metrics(), api_key, model_name, on_load_error,
        None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}, cors_origins)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.middleware("http")(guard)  # innermost: refusals pass through `observe`, which counts them
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.middleware("http")(observe)
    app.include_router(router)
    return app


def _state(request: Request) -> ServeState:
    return request.app.state.qwen_ft


@asynccontextmanager
async def lifespan(app: FastAPI):
    state: ServeState = app.state.qwen_ft
    batcher = Batcher(state.limits, state.metrics)
    state.batcher = batcher
    loader = asyncio.create_task(_load_model(state, batcher))
    collector = asyncio.create_task(batcher.run())
    yield
    batcher.draining = True  # uvicorn has waited for in-flight requests; let the queue finish
    batcher.queue.put_nowait(None)
    await collector
    await loader
    batcher.executor.shutdown(wait=True)


async def _load_model(state: ServeState, batcher: Batcher) -> None:
    loop = asyncio.get_running_loop()
    limits = state.limits
    try:
        classifier = await loop.run_in_executor(batcher.executor, state.load)
        batcher.abstain = classifier.abstention(limits.min_confidence, limits.fallback_label, limits.decode,
                                                limits.normalize)
        batcher.classifier = classifier
        log.info("model loaded: %s (%d labels); serving", state.model_name, len(batcher.classifier.labels))
    except Exception as e:
        batcher.load_error = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        log.error("could not load the model: %s", batcher.load_error)
        if state.on_load_error:
            state.on_load_error(batcher.load_error)


# ----------------------------------------------------------------------------- middleware

async def guard(request: Request, call_next):
    state = _state(request)
    refused = refusal(request, state.allowed, state.cors_origins, state.api_key)
    if refused is not None:  # counted in /metrics by `observe`, the outer middleware
        return error_response(refused)
    return await call_next(request)


async def observe(request: Request, call_next):
    metrics = _state(request).metrics
    t0 = time.perf_counter()
    endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
    try:
        response = await call_next(request)
    except Exception:
        metrics.request(endpoint, 500, time.perf_counter() - t0)
        raise
    metrics.request(endpoint, response.status_code, time.perf_counter() - t0)
    return response


# ----------------------------------------------------------------------------- the routes

router = APIRouter()


def ready(state: ServeState) -> Batcher:
    """The batcher once the model is loaded; else 503 (loading, or why it could not be loaded)."""
    batcher = state.batcher
    if batcher.classifier is None:
        if batcher.load_error:
            raise ApiError(503, f"the model could not be loaded: {batcher.load_error}", "unavailable")
        raise ApiError(503, "the model is loading; retry shortly", "unavailable", {"Retry-After": "2"})
    return batcher


async def classify(batcher: Batcher, rows: list[dict], top_k: int) -> list[dict]:
    labels = batcher.classifier.labels
    if top_k > len(labels):
        raise ApiError(422, f"top_k {top_k} is more than the {len(labels)} labels")
    return await batcher.submit(rows, top_k)


@router.get("/health")
async def health(request: Request):
    state = _state(request)
    batcher = state.batcher
    if batcher.classifier is None or batcher.draining:
        status = "error" if batcher.load_error else "draining" if batcher.draining else "loading"
        return JSONResponse({"status": status, **({"error": batcher.load_error} if batcher.load_error else {})},
                            503, {"Retry-After": "2"})
    return {"status": "ok", "model": state.model_name}


@router.get("/metrics")
async def prometheus(request: Request):
    state = _state(request)
    batcher = state.batcher
    return PlainTextResponse(state.metrics.render(batcher.pending_texts, batcher.classifier is not None),
                             media_type="text/plain; version=0.0.4")


@router.get("/v1/labels")
async def labels(request: Request):
    state = _state(request)
    authorize(request, state.api_key)
    clf = ready(state).classifier
    return {"task": clf.task.name, "labels": clf.labels,
            "id2label": {str(i): lab for i, lab in enumerate(clf.labels)},
            "label2id": {lab: i for i, lab in enumerate(clf.labels)}}


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    authorize(request, state.api_key)
    ready(state)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                        "owned_by": "qwen-ft"}]}


@router.post("/v1/classify")
async def classify_endpoint(request: Request):
    state = _state(request)
    authorize(request, state.api_key)
    batcher = ready(state)
    req = await read_json(request, ClassifyRequest, state.limits)
    if (req.text is None) == (req.texts is None):
        raise ApiError(422, 'send exactly one of "text" (one input) or "texts" (a list)')
    items = [req.text] if req.text is not None else req.texts
    if not items:
        raise ApiError(422, '"texts" is empty')
    rows = to_rows(batcher.classifier, items, state.limits)
    results = await classify(batcher, rows, req.top_k)
    return {"model": state.model_name, "results": [result(r, req.top_k) for r in results]}


@router.post("/classify")
async def http_classify(request: Request):
    """semantic-router's `http_classify` contract: {"inputs": text} -> every label with its score."""
    state = _state(request)
    authorize(request, state.api_key)
    batcher = ready(state)
    req = await read_json(request, HttpClassifyRequest, state.limits)
    items = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    if not items:
        raise ApiError(422, '"inputs" is empty')
    labels = batcher.classifier.labels
    results = await classify(batcher, to_rows(batcher.classifier, items, state.limits), len(labels))
    scored = [label_scores(r, labels) for r in results]
    return scored[0] if isinstance(req.inputs, str) else scored


@router.post("/v1/chat/completions")
async def chat(request: Request):
    state = _state(request)
    authorize(request, state.api_key)
    batcher = ready(state)
    req = await read_json(request, ChatRequest, state.limits)
    if req.model is not None and req.model != state.model_name:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server has {state.model_name!r} "
                            "(GET /v1/models)", "model_not_found")
    if req.n not in (None, 1):
        raise ApiError(400, f"n={req.n} is not supported; the answer is one label")
    content = last_user_text(req)
    n_labels = len(batcher.classifier.labels)
    shown = min(n_labels, req.top_logprobs or 0)
    scored = n_labels if req.logprobs else max(1, shown)  # logprobs need the answer's own probability
    res = (await classify(batcher, to_rows(batcher.classifier, [content], state.limits), scored))[0]
    reply = chat_completion(res, state.model_name, result(res, max(1, shown)), shown if req.logprobs else None)
    if req.stream:
        return StreamingResponse(iter(chat_stream(reply)), media_type="text/event-stream")
    return reply
