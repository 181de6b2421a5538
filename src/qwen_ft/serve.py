"""HTTP over a Classifier: FastAPI app factory with dynamic micro-batching. Knows HTTP, not tokens.

Requests are parsed and checked on the event loop (schema, limits, key), then queued; one collector
task gathers concurrent requests into one batch (up to `max_batch_size` texts, waiting at most
`max_wait_ms` after the first) and runs it in the single inference thread. While that thread computes,
new requests queue up and form the next batch. The queue is bounded in texts: past `max_queue` the
server answers 503 with Retry-After instead of growing without limit.

Endpoints: POST /v1/classify, GET /v1/labels, POST /v1/chat/completions (OpenAI-compatible: the reply
is the label), GET /v1/models, GET /health (503 until the model is loaded), GET /metrics (Prometheus
text format, hand-written: prometheus_client is not a dependency and the format is a few lines).
Errors are JSON in OpenAI's shape, {"error": {"message", "type", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_ft.errors import UserError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


# ----------------------------------------------------------------------------- request schemas

class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | dict | None = None
    texts: list[str | dict] | None = None
    top_k: int = Field(1, ge=1)


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
    top_logprobs: int | None = None


def schema_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Counters and histograms in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = {}
        self.batches = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.texts = 0
        self.abstentions = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            counts = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
            counts[_bucket(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds

    def abstained(self, n: int) -> None:
        with self.lock:
            self.abstentions += n

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[_bucket(BATCH_BUCKETS, size)] += 1
            self.batch_sum += size
            self.texts += size

    def render(self, queued: int, loaded: bool) -> str:
        with self.lock:
            out = ["# HELP qwen_ft_requests_total HTTP requests by endpoint and status code.",
                   "# TYPE qwen_ft_requests_total counter"]
            out += [f'qwen_ft_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP qwen_ft_request_errors_total HTTP requests answered with a status >= 400.",
                    "# TYPE qwen_ft_request_errors_total counter"]
            errors: dict[str, int] = {}
            for (e, c), n in self.requests.items():
                if c >= 400:
                    errors[e] = errors.get(e, 0) + n
            out += [f'qwen_ft_request_errors_total{{endpoint="{e}"}} {n}' for e, n in sorted(errors.items())]
            out += ["# HELP qwen_ft_request_latency_seconds Time from request to response.",
                    "# TYPE qwen_ft_request_latency_seconds histogram"]
            for e, counts in sorted(self.latency.items()):
                out += _histogram("qwen_ft_request_latency_seconds", f'endpoint="{e}",', LATENCY_BUCKETS, counts,
                                  self.latency_sum[e])
            out += ["# HELP qwen_ft_batch_size Texts per forward batch.", "# TYPE qwen_ft_batch_size histogram"]
            out += _histogram("qwen_ft_batch_size", "", BATCH_BUCKETS, self.batches, self.batch_sum)
            out += ["# HELP qwen_ft_texts_total Texts classified.", "# TYPE qwen_ft_texts_total counter",
                    f"qwen_ft_texts_total {self.texts}",
                    "# HELP qwen_ft_abstentions_total Texts answered with the fallback label (confidence below the "
                    "threshold).", "# TYPE qwen_ft_abstentions_total counter",
                    f"qwen_ft_abstentions_total {self.abstentions}",
                    "# HELP qwen_ft_queue_texts Texts waiting or being computed.", "# TYPE qwen_ft_queue_texts gauge",
                    f"qwen_ft_queue_texts {queued}",
                    "# HELP qwen_ft_model_loaded 1 once the model is loaded.", "# TYPE qwen_ft_model_loaded gauge",
                    f"qwen_ft_model_loaded {int(loaded)}"]
        return "\n".join(out) + "\n"


def _bucket(bounds: tuple, value: float) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def _histogram(name: str, labels: str, bounds: tuple, counts: list[int], total: float) -> list[str]:
    out, cumulative = [], 0
    for bound, n in zip((*bounds, "+Inf"), counts):
        cumulative += n
        out.append(f'{name}_bucket{{{labels}le="{bound}"}} {cumulative}')
    plain = labels.rstrip(",")
    out += [f"{name}_sum{{{plain}}} {total}" if plain else f"{name}_sum {total}",
            f"{name}_count{{{plain}}} {cumulative}" if plain else f"{name}_count {cumulative}"]
    return out


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

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(load: Callable[[], object], *, limits: Limits | None = None, api_key: str | None = None,
               model_name: str = "qwen-ft", on_load_error: Callable[[str], None] | None = None,
               allowed_hosts: tuple[str, ...] | None = None, cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """An app over the classifier that `load()` returns; it is called in the inference thread at startup,
    and /health answers 503 until it returns. `allowed_hosts`: the Host names served (others get 421: a web
    page that rebinds its own name to this address cannot read answers); None serves any. With `api_key`
    every route but /health needs it; no CORS headers unless `cors_origins` names the origins."""
    limits = limits or Limits()
    metrics = Metrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(limits, metrics)
        state["batcher"] = batcher
        loop = asyncio.get_running_loop()

        async def load_model():
            try:
                classifier = await loop.run_in_executor(batcher.executor, load)
                batcher.abstain = classifier.abstention(limits.min_confidence, limits.fallback_label, limits.decode,
                                                        limits.normalize)
                batcher.classifier = classifier
                log.info("model loaded: %s (%d labels); serving", model_name, len(batcher.classifier.labels))
            except Exception as e:
                batcher.load_error = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                log.error("could not load the model: %s", batcher.load_error)
                if on_load_error:
                    on_load_error(batcher.load_error)

        loader = asyncio.create_task(load_model())
        collector = asyncio.create_task(batcher.run())
        yield
        batcher.draining = True  # uvicorn has waited for in-flight requests; let the queue finish
        batcher.queue.put_nowait(None)
        await collector
        await loader
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="qwen-ft classifier", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, e.status, e.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else
                                       "invalid_request_error"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", "internal_error"))

    allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    def refusal(request: Request) -> ApiError | None:
        """Why this request is refused before any route sees it (None: it is not)."""
        if allowed is not None and host_name(request.headers.get("host", "")) not in allowed:
            return ApiError(421, "this server does not answer for that Host name (add it with --allowed-host)",
                            "misdirected_request")
        if request.method == "OPTIONS" and cors_origins:
            return None  # a CORS preflight: the CORS middleware answers it
        if request.url.path != "/health":
            try:
                authorize(request)
            except ApiError as e:
                return e
        if request.method == "POST":
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"POST bodies must be sent as Content-Type: application/json (got "
                                     f"{kind or 'none'})", "unsupported_media_type")
        return None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = refusal(request)
        if refused is not None:  # counted in /metrics by `observe`, the outer middleware
            return error_response(refused)
        return await call_next(request)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        try:
            response = await call_next(request)
        except Exception:
            metrics.request(endpoint, 500, time.perf_counter() - t0)
            raise
        metrics.request(endpoint, response.status_code, time.perf_counter() - t0)
        return response

    def ready():
        batcher = state["batcher"]
        if batcher.classifier is None:
            if batcher.load_error:
                raise ApiError(503, f"the model could not be loaded: {batcher.load_error}", "unavailable")
            raise ApiError(503, "the model is loading; retry shortly", "unavailable", {"Retry-After": "2"})
        return batcher

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", "authentication_error",
                           {"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request, schema: type[BaseModel]) -> BaseModel:
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

    def to_rows(batcher, items: list) -> list[dict]:
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
                rows.append(batcher.classifier.row(item))
            except UserError as e:
                raise ApiError(422, f"text {i}: {e.message}") from None
        try:
            batcher.classifier.check_rows(rows)
        except UserError as e:
            raise ApiError(422, e.message) from None
        return rows

    async def classify(batcher, rows: list[dict], top_k: int) -> list[dict]:
        labels = batcher.classifier.labels
        if top_k > len(labels):
            raise ApiError(422, f"top_k {top_k} is more than the {len(labels)} labels")
        return await batcher.submit(rows, top_k)

    def result(res: dict, top_k: int) -> dict:
        out = {"label": res["pred"], "probability": res["probability"], "raw_probability": res["raw_probability"],
               "top": [{"label": lab, "probability": p} for lab, p in res["top"][:top_k]]}
        if "abstained" in res:
            out.update({"abstained": res["abstained"], "model_label": res.get("model_label", res["pred"])})
        return out

    @app.get("/health")
    async def health():
        batcher = state["batcher"]
        if batcher.classifier is None or batcher.draining:
            status = "error" if batcher.load_error else "draining" if batcher.draining else "loading"
            return JSONResponse({"status": status, **({"error": batcher.load_error} if batcher.load_error else {})},
                                503, {"Retry-After": "2"})
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def prometheus():
        batcher = state["batcher"]
        return PlainTextResponse(metrics.render(batcher.pending_texts, batcher.classifier is not None),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/labels")
    async def labels(request: Request):
        authorize(request)
        clf = ready().classifier
        return {"task": clf.task.name, "labels": clf.labels,
                "id2label": {str(i): lab for i, lab in enumerate(clf.labels)},
                "label2id": {lab: i for i, lab in enumerate(clf.labels)}}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        ready()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qwen-ft"}]}

    @app.post("/v1/classify")
    async def classify_endpoint(request: Request):
        authorize(request)
        batcher = ready()
        req = await read_json(request, ClassifyRequest)
        if (req.text is None) == (req.texts is None):
            raise ApiError(422, 'send exactly one of "text" (one input) or "texts" (a list)')
        items = [req.text] if req.text is not None else req.texts
        if not items:
            raise ApiError(422, '"texts" is empty')
        rows = to_rows(batcher, items)
        results = await classify(batcher, rows, req.top_k)
        return {"model": model_name, "results": [result(r, req.top_k) for r in results]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        batcher = ready()
        req = await read_json(request, ChatRequest)
        if req.stream:
            raise ApiError(400, "stream: true is not supported; the answer is one label")
        if req.n not in (None, 1):
            raise ApiError(400, f"n={req.n} is not supported; the answer is one label")
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
        top_k = min(len(batcher.classifier.labels), max(1, req.top_logprobs or 1))
        rows = to_rows(batcher, [content])
        res = (await classify(batcher, rows, top_k))[0]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res["pred"]},
                         "finish_reason": "stop", "logprobs": None}],
            "classification": result(res, top_k),
        }

    return app
