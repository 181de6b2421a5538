"""`qwen-ft serve`: a trained classifier behind HTTP (uvicorn + qwen_ft.inference.serve), 127.0.0.1:8000 by
default."""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from qwen_ft.errors import UserError

log = logging.getLogger(__name__)


def check_port(host: str, port: int) -> None:
    """A clear error before loading anything when the address is taken or cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                        "Choose another --port (or stop the process that holds it).") from None


def run_serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
              max_wait_ms: float = 2.0, max_queue: int = 256, max_texts: int = 64, max_chars: int = 20_000,
              api_key: str | None = None, decode: str = "auto", normalize: str = "auto",
              precision: str = "auto", base_model: str | None = None, trust_remote_code: bool = False,
              model_name: str | None = None, min_confidence: float | None = None, fallback_label: str | None = None,
              adapter_scale: float = 1.0, allowed_hosts: list[str] | None = None,
              cors_origins: list[str] | None = None) -> None:
    import uvicorn

    from qwen_ft.inference.engine import Classifier
    from qwen_ft.inference.serve import Limits, create_app

    _check_flags(model_path, port, max_batch_size, max_wait_ms, max_queue, max_texts, max_chars, decode, normalize,
                 min_confidence)
    api_key = api_key or os.environ.get("QWEN_FT_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    check_port(host, port)
    limits = Limits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                    max_texts=max_texts, max_chars=max_chars, decode=decode, normalize=normalize,
                    min_confidence=min_confidence, fallback_label=fallback_label)
    failure: dict = {}
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failure["error"] = message
        if server is not None:
            server.should_exit = True

    def load():
        return Classifier.load(model_path, base_model=base_model, precision=precision,
                               trust_remote_code=trust_remote_code, adapter_scale=adapter_scale)

    app = create_app(load, limits=limits, api_key=api_key, on_load_error=on_load_error,
                     model_name=model_name or Path(model_path).resolve().name,
                     allowed_hosts=served_hosts(host, allowed_hosts), cors_origins=tuple(cors_origins or ()))
    # SIGTERM / Ctrl-C: uvicorn stops accepting, waits for in-flight requests (up to 30 s), then the app's
    # shutdown finishes the queue
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None)
    server = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d (loading the model; /health is 503 until it is ready)", model_path,
             host, port)
    _run_until_stopped(server)
    if failure:
        raise UserError(f"the model could not be loaded: {failure['error']}")


def _check_flags(model_path: str, port: int, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 max_texts: int, max_chars: int, decode: str, normalize: str, min_confidence: float | None) -> None:
    for name, value in (("--max-batch-size", max_batch_size), ("--max-queue", max_queue),
                        ("--max-texts-per-request", max_texts), ("--max-chars", max_chars)):
        if value < 1:
            raise UserError(f"{name} must be >= 1 (got {value})")
    if max_wait_ms < 0 or not 0 < port < 65536:
        raise UserError(f"--max-wait-ms must be >= 0 and --port in 1..65535 (got {max_wait_ms}, {port})")
    if normalize not in ("none", "auto") and decode not in ("exact", "auto"):
        raise UserError(f"--normalize {normalize} applies to --decode exact", "Add --decode exact.")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise UserError(f"--min-confidence must be a probability in [0, 1] (got {min_confidence})")
    if not Path(model_path).is_dir():
        raise UserError(f"model folder not found: {model_path}", "Pass a run folder or a merged model folder.")


def served_hosts(host: str, allowed_hosts: list[str] | None) -> tuple[str, ...] | None:
    """The Host names answered. Loopback: only loopback names (a page that rebinds its name to 127.0.0.1 gets
    421), plus those named; listening wider: the names given, else any (None: the machine's names are not
    known here)."""
    from qwen_ft.inference.serve_guard import LOOPBACK_NAMES

    if host in LOOPBACK_NAMES:
        return tuple(LOOPBACK_NAMES) + tuple(allowed_hosts or ())
    return tuple(allowed_hosts) if allowed_hosts else None


def _run_until_stopped(server) -> None:
    """uvicorn restores the handler it found and raises SIGTERM again once it has drained: with this one in
    place the command returns (exit 0: a requested, clean stop) instead of dying by the signal."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_parser(sub, name: str) -> None:
    from qwen_ft.commands.predict_file import add_abstention_flags

    p = sub.add_parser(name, help="Serve a trained classifier over HTTP (classify, OpenAI chat, metrics).")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default loopback only).")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="Most texts gathered into one forward batch.")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="How long a batch's first request waits for others to join it.")
    p.add_argument("--max-queue", type=int, default=256,
                   help="Most texts waiting or being computed; more are answered 503 with Retry-After.")
    p.add_argument("--max-texts-per-request", type=int, default=64, help="Larger requests are answered 413.")
    p.add_argument("--max-chars", type=int, default=20_000, help="Longer texts are answered 413.")
    p.add_argument("--api-key", default=None,
                   help="Require 'Authorization: Bearer KEY' on every route but /health (or set QWEN_FT_API_KEY).")
    p.add_argument("--decode", default="auto", choices=("auto", "constrained", "exact"),
                   help="auto (default): constrained where answers end with an end token, else exact; constrained (fast; "
                        "first-token probabilities); exact (each label's full probability).")
    p.add_argument("--normalize", default="auto", choices=("auto", "none", "token", "char"), help="With --decode exact (auto: per character for plain prompts, else none).")
    p.add_argument("--model-name", default=None, help="Name reported to clients (default: the folder's name).")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--base-model", default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    add_abstention_flags(p)
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="Also answer requests whose Host is NAME (repeatable). On loopback only loopback names are "
                        "served by default; on other addresses any name unless this is given.")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="Allow browser pages from ORIGIN (e.g. https://app.example) to call the API (repeatable); "
                        "no CORS headers without it.")
    p.set_defaults(func=lambda a: run_serve(
        a.model_path, a.host, a.port, a.max_batch_size, a.max_wait_ms, a.max_queue, a.max_texts_per_request,
        a.max_chars, a.api_key, a.decode, a.normalize, a.precision, a.base_model, a.trust_remote_code,
        a.model_name, a.min_confidence, a.fallback_label, a.adapter_scale, a.allowed_host, a.cors_origin))
