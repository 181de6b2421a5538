"""Load test of `qwen-ft serve` against offline `qwen-ft predict` on the same texts (127.0.0.1 only).

    python benchmarks/serve_load.py --model-path RUN [--requests 200] [--concurrency 1,4,16] [--json out.json]

Starts the real server as a subprocess on a free loopback port, sends `--requests` single-text requests at
each concurrency (httpx, asyncio; each level stops early after `--max-seconds`), and prints requests/s and
p50/p95/p99 latency next to offline `predict` rows/s on the same texts, and whether the labels equal
offline predict's. Texts: `--texts FILE` (jsonl/csv/parquet with a text column) or the run's own split
questions, cycled to the request count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_texts(args) -> list[str]:
    if args.texts:
        sys.path.insert(0, str(REPO / "src"))
        from qwen_ft.inference.batch_files import file_format, read_records

        records = read_records(args.texts, file_format(args.texts, None, "input"), 1024)
        texts = [str(r.get(args.text_column) or "") for r in records]
    else:
        sys.path.insert(0, str(REPO / "src"))
        from qwen_ft.runs import RunDir

        run = RunDir(args.model_path)
        texts = [r["question"] for split in ("validation", "test", "train") if run.has_split(split)
                 for r in run.split(split)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        sys.exit("no texts found (pass --texts FILE)")
    return [texts[i % len(texts)] for i in range(args.requests)]


def env(args) -> dict:
    out = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    if args.threads:
        out["QWEN_FT_THREADS"] = str(args.threads)
    return out


def offline(args, texts: list[str], work: Path) -> tuple[list[str], float]:
    """Labels and rows/s of `qwen-ft predict` on the texts (its own timing: the predict loop, not the load)."""
    src, out = work / "texts.jsonl", work / "offline.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cmd = [sys.executable, "-m", "qwen_ft", "predict", "--model-path", args.model_path, "--input", str(src),
           "--output", str(out), "--precision", args.precision, "--batch-size", str(args.max_batch_size),
           "--decode", args.decode]
    proc = subprocess.run(cmd, env=env(args), capture_output=True, text=True, timeout=args.max_seconds * 10)
    if proc.returncode != 0:
        sys.exit(f"offline predict failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rate = re.search(r"in ([\d.]+) s: ([\d.]+) rows/s", proc.stdout)
    labels = [json.loads(x)["label"] for x in out.read_text().splitlines()]
    return labels, float(rate.group(2)) if rate else float("nan")


async def level(url: str, texts: list[str], concurrency: int, max_seconds: float, api_key: str | None) -> dict:
    """Send the texts with `concurrency` requests in flight; latencies, labels and requests/s."""
    latencies: list[float] = []
    labels: dict[int, str] = {}
    errors: dict[int, int] = {}
    queue = iter(range(len(texts)))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    t0 = time.perf_counter()

    async def worker(client: httpx.AsyncClient):
        for i in queue:
            if time.perf_counter() - t0 > max_seconds:
                return
            start = time.perf_counter()
            r = await client.post("/v1/classify", json={"text": texts[i]}, headers=headers)
            latencies.append(time.perf_counter() - start)
            if r.status_code == 200:
                labels[i] = r.json()["results"][0]["label"]
            else:
                errors[r.status_code] = errors.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1), "p99_ms": round(q[98] * 1000, 1), "errors": errors, "labels": labels}


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen_ft", "serve", "--model-path", args.model_path, "--host", "127.0.0.1",
           "--port", str(port), "--precision", args.precision, "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--max-queue", str(max(256, 4 * max(args.levels))),
           "--decode", args.decode]
    proc = subprocess.Popen(cmd, env=env(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + args.max_seconds * 5
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited (rc {proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become ready in time")


def batch_counts(url: str) -> tuple[float, float]:
    """(texts, forward batches) so far, from the server's /metrics (qwen_ft_batch_size histogram)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = dict(re.findall(r"^qwen_ft_batch_size_(sum|count) ([\d.e+]+)$", text, re.M))
    return float(found.get("sum", 0)), float(found.get("count", 0))


def table(result: dict) -> str:
    rows = ["| concurrency | requests | requests/s | p50 ms | p95 ms | p99 ms | mean batch | vs c=1 | vs offline | "
            "labels = predict |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = result["levels"][0]["requests_per_s"] if result["levels"] else None
    for lv in result["levels"]:
        rows.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['requests_per_s']} | {lv['p50_ms']} | "
                    f"{lv['p95_ms']} | {lv['p99_ms']} | {lv.get('mean_batch', '-')} | {lv['requests_per_s'] / base:.2f}x | "
                    f"{lv['requests_per_s'] / result['offline_rows_per_s']:.0%} | {lv['labels_equal']} |")
    rows.append(f"| offline predict | {result['texts']} | {result['offline_rows_per_s']} rows/s | | | | | | | |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--requests", type=int, default=200, help="Requests per concurrency level.")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--max-seconds", type=float, default=120, help="Stop sending at a level after this long.")
    p.add_argument("--texts", default=None, help="Texts file (default: the run's split questions).")
    p.add_argument("--text-column", default="text")
    p.add_argument("--precision", default="auto")
    p.add_argument("--decode", default="constrained", choices=("constrained", "exact"))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=None, help="QWEN_FT_THREADS for the server and predict.")
    p.add_argument("--json", default=None, help="Also write the results here.")
    args = p.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    texts = load_texts(args)
    with tempfile.TemporaryDirectory() as work:
        offline_labels, offline_rate = offline(args, texts, Path(work))
    port = free_port()
    server = start_server(args, port)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(level(url, texts[:8], 2, args.max_seconds, None))  # warm-up
        levels = []
        for c in args.levels:
            before = batch_counts(url)
            lv = asyncio.run(level(url, texts, c, args.max_seconds, None))
            after = batch_counts(url)
            lv["mean_batch"] = round((after[0] - before[0]) / max(1, after[1] - before[1]), 2)
            got = lv.pop("labels")
            lv["labels_equal"] = bool(got) and all(offline_labels[i] == lab for i, lab in got.items())
            lv["labels_compared"] = len(got)
            levels.append(lv)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    result = {"model_path": args.model_path, "texts": len(texts), "decode": args.decode,
              "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "threads": args.threads,
              "offline_rows_per_s": offline_rate, "levels": levels}
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
