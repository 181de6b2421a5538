"""`qwen-ft mcp`: a trained classifier as an MCP server (qwen_ft.inference.mcp_server), over stdio by default,
or streamable HTTP at http://HOST:PORT/mcp (plus GET /health) with --http."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from qwen_ft.commands.serve import check_port
from qwen_ft.errors import UserError
from qwen_ft.inference.mcp_server import MAX_CHARS, build_server, category_info

log = logging.getLogger(__name__)


def run_mcp(model_path: str, http: bool = False, host: str = "127.0.0.1", port: int = 8090,
            max_chars: int = MAX_CHARS, category_file: str | None = None, precision: str = "auto",
            base_model: str | None = None, trust_remote_code: bool = False, adapter_scale: float = 1.0) -> None:
    if not Path(model_path).is_dir():
        raise UserError(f"model folder not found: {model_path}", "Pass a run folder or a merged model folder.")
    if max_chars < 1 or not 0 < port < 65536:
        raise UserError(f"--max-chars must be >= 1 and --port in 1..65535 (got {max_chars}, {port})")
    info = _read_json(category_file) if category_file else None
    if http:
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: anyone who can reach this port can use the model", host)
        check_port(host, port)
    else:
        _keep_stdout_for_the_protocol()
    from qwen_ft.inference.engine import Classifier

    with contextlib.redirect_stdout(sys.stderr):  # a library's stray print would corrupt the stdio stream
        clf = Classifier.load(model_path, base_model=base_model, precision=precision,
                              trust_remote_code=trust_remote_code, adapter_scale=adapter_scale)
    info = category_info(info, clf.labels, category_file) if info is not None else None
    server = build_server(clf, max_chars=max_chars, info=info, name=Path(model_path).resolve().name)
    if not http:
        log.info("serving %s over MCP stdio (%d categories)", model_path, len(clf.labels))
        server.run("stdio")
        return
    import uvicorn

    # plain JSON answers (no SSE stream) to each POST: what semantic-router's own example servers send
    app = server.streamable_http_app(host=host, json_response=True)
    log.info("serving %s over MCP at http://%s:%d/mcp (%d categories)", model_path, host, port, len(clf.labels))
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30, log_config=None)
    # as `qwen-ft serve`: uvicorn drains on SIGTERM, then raises it again; with this handler the command returns
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_json(path: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None


def _keep_stdout_for_the_protocol() -> None:
    """Over stdio, standard output carries the protocol's messages: log lines go to standard error instead."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Serve a trained classifier as an MCP server (list_categories, classify_text), "
                                  "for semantic-router and other MCP clients.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("--http", action="store_true",
                   help="Serve streamable HTTP at http://HOST:PORT/mcp (and GET /health) instead of stdio.")
    p.add_argument("--host", default="127.0.0.1", help="With --http: address to listen on (default loopback only).")
    p.add_argument("--port", type=int, default=8090, help="With --http: port (default 8090).")
    p.add_argument("--max-chars", type=int, default=MAX_CHARS, help="Longer texts are a tool error (default %(default)s, as serve).")
    p.add_argument("--category-info", default=None, metavar="FILE",
                   help='JSON {"category_descriptions": {category: text}, "category_system_prompts": {category: '
                        'text}} (either optional) that list_categories returns beside the names.')
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--base-model", default=None)
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="Multiply the adapter's update by this (0: the base model, 1: the trained run).")
    p.set_defaults(func=lambda a: run_mcp(a.model_path, a.http, a.host, a.port, a.max_chars, a.category_info,
                                          a.precision, a.base_model, a.trust_remote_code, a.adapter_scale))
