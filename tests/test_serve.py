"""The real server (uvicorn on a free loopback port) over a tiny trained run, with real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from qwen_ft.cli import main
from qwen_ft.inference.engine import Classifier
from qwen_ft.inference.serve import Limits, create_app
from tests.conftest import REPO

TEXTS = [f"{a} {b}?" for a in ("What is a tort", "How do cells divide", "Integrate x dx", "Who was Caesar",
                                "Why do markets crash", "What is entropy") for b in ("", "in short", "exactly", "now")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clf(tiny_run) -> Classifier:
    return Classifier.load(tiny_run, precision="fp32")


@contextmanager
def running(load, **kwargs):
    """uvicorn serving create_app(load, ...) in a thread; yields the base URL."""
    port = free_port()
    app = create_app(load, **kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_ready(url: str) -> None:
    for _ in range(600):
        if httpx.get(f"{url}/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the server never became ready")


@pytest.fixture(scope="module")
def url(clf):
    with running(lambda: clf, limits=Limits(max_wait_ms=100, max_texts=4, max_chars=100)) as base:
        wait_ready(base)
        yield base


async def post_all(url: str, bodies: list[dict], headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/classify", json=b, headers=headers) for b in bodies))


def metric(url: str, name: str) -> float:
    lines = [x for x in httpx.get(f"{url}/metrics").text.splitlines() if x.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_health_is_503_until_the_model_is_loaded(clf):
    gate = threading.Event()

    def load():
        gate.wait(60)
        return clf

    with running(load) as base:
        r = httpx.get(f"{base}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(f"{base}/v1/classify", json={"text": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"] and r.headers["Retry-After"]
        assert "qwen_ft_model_loaded 0" in httpx.get(f"{base}/metrics").text
        gate.set()
        wait_ready(base)
        assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": "qwen-ft"}
        assert "qwen_ft_model_loaded 1" in httpx.get(f"{base}/metrics").text


def test_concurrent_requests_are_batched_and_match_predict(url, clf, tiny_run, tmp_path):
    batches_before = metric(url, "qwen_ft_batch_size_count")
    responses = asyncio.run(post_all(url, [{"text": t, "top_k": 3} for t in TEXTS]))
    assert all(r.status_code == 200 for r in responses)
    served = [r.json()["results"][0] for r in responses]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["predict", "--model-path", str(tiny_run), "--input", str(src), "--output", str(out),
                 "--precision", "fp32", "--top", "3"]) == 0
    offline = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["label"] for s in served] == [o["label"] for o in offline]
    for s, o in zip(served, offline):
        assert s["probability"] == pytest.approx(o["probability"], abs=1e-4)
        assert [t["label"] for t in s["top"]] == [lab for lab, _ in o["top"]]
    # 24 requests in flight together (each waits up to 100 ms for others): fewer forward batches than requests
    assert metric(url, "qwen_ft_batch_size_count") - batches_before < len(TEXTS)
    several = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS[:4]}).json()["results"]
    assert [s["label"] for s in several] == [o["label"] for o in offline[:4]]
    labels = httpx.get(f"{url}/v1/labels").json()
    assert labels["labels"] == clf.labels and labels["id2label"]["0"] == clf.labels[0]


def test_openai_client_gets_the_label(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["qwen-ft"]
    offline = httpx.post(f"{url}/v1/classify", json={"texts": TEXTS[:2]}).json()["results"]
    for text, expected in zip(TEXTS[:2], offline):
        reply = client.chat.completions.create(model="qwen-ft", messages=[
            {"role": "system", "content": "ignored"}, {"role": "user", "content": text}])
        assert reply.choices[0].message.content == expected["label"]
        assert reply.choices[0].finish_reason == "stop"
    parts = client.chat.completions.create(model="qwen-ft", messages=[
        {"role": "user", "content": [{"type": "text", "text": TEXTS[0]}]}])
    assert parts.choices[0].message.content == offline[0]["label"]
    # OpenAI clients stream by default in many frameworks: one chunk holding the whole label, then [DONE]
    chunks = list(client.chat.completions.create(model="qwen-ft", stream=True, messages=[
        {"role": "user", "content": TEXTS[0]}]))
    assert len(chunks) == 1 and chunks[0].choices[0].delta.content == offline[0]["label"]
    assert chunks[0].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_openai_logprobs_are_the_label_distribution(url, clf):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="qwen-ft", messages=[{"role": "user", "content": TEXTS[2]}],
                                           logprobs=True, top_logprobs=3)
    (res,), _ = clf.classify([clf.row(TEXTS[2])], top_k=len(clf.labels))
    entry = reply.choices[0].logprobs.content[0]
    assert entry.token == reply.choices[0].message.content == res["pred"]
    assert entry.logprob == pytest.approx(math.log(res["probability"]), abs=1e-5)
    assert [t.token for t in entry.top_logprobs] == [lab for lab, _ in res["top"][:3]]
    assert [math.exp(t.logprob) for t in entry.top_logprobs] == pytest.approx([p for _, p in res["top"][:3]],
                                                                               abs=1e-5)
    assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model="qwen-ft", messages=[{"role": "user", "content": TEXTS[2]}])
    assert plain.choices[0].logprobs is None


def test_http_classify_meets_semantic_routers_contract(url, clf):
    """The checks semantic-router's http_classifier.go makes on an answer: every label of the mapping exactly
    once (matched by name), each score finite within [0, 1], the scores summing to 1 within 0.02."""
    labels = json.loads((Path(clf.info["model_path"]) / "label_mapping.json").read_text())["labels"]
    for text in TEXTS[:3]:
        r = httpx.post(f"{url}/classify", json={"inputs": text})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        scores = r.json()
        assert isinstance(scores, list) and sorted(s["label"] for s in scores) == sorted(labels)
        assert all(0.0 <= s["score"] <= 1.0 and math.isfinite(s["score"]) for s in scores)
        assert abs(sum(s["score"] for s in scores) - 1.0) <= 0.02
        (res,), _ = clf.classify([clf.row(text)], top_k=len(labels))  # = predict --top K with K = every label
        top = dict(res["top"])
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(top, abs=1e-6)
        assert max(scores, key=lambda s: s["score"])["label"] == res["pred"]
    batch = httpx.post(f"{url}/classify", json={"inputs": TEXTS[:2]}).json()
    assert len(batch) == 2 and all(len(b) == len(labels) for b in batch)
    for body, status in ((b"{}", 422), (b'{"inputs": 3}', 422), (b'{"inputs": []}', 422), (b"{bad", 400)):
        r = httpx.post(f"{url}/classify", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status and r.json()["error"]["message"], r.text


BAD = [  # (path, raw body, status, part of the message)
    ("/v1/classify", b"{bad", 400, "malformed JSON"),
    ("/v1/classify", b"[" * 100_000 + b"]" * 100_000, 413, "over the limit"),
    ("/v1/classify", b"[" * 20_000 + b"]" * 20_000, 400, "nested too deeply"),
    ("/v1/classify", b'["a"]', 422, "must be a JSON object"),
    ("/v1/classify", b"\xff\xfe", 400, "malformed JSON"),
    ("/v1/classify", b'{"txt": "a"}', 422, "txt: Extra inputs are not permitted"),
    ("/v1/classify", b"{}", 422, 'exactly one of "text"'),
    ("/v1/classify", b'{"text": "a", "texts": ["b"]}', 422, 'exactly one of "text"'),
    ("/v1/classify", b'{"texts": []}', 422, '"texts" is empty'),
    ("/v1/classify", b'{"texts": [1]}', 422, "texts.0"),
    ("/v1/classify", b'{"text": "   "}', 422, "non-empty text"),
    ("/v1/classify", b'{"text": "\\ud800"}', 422, "unpaired surrogate"),
    ("/v1/classify", b'{"texts": ["a", "b", "c", "d", "e"]}', 413, "limit is 4 (--max-texts-per-request)"),
    ("/v1/classify", json.dumps({"text": "x" * 101}).encode(), 413, "limit is 100 (--max-chars)"),
    ("/v1/classify", b'{"text": "a", "top_k": 0}', 422, "top_k"),
    ("/v1/classify", b'{"text": "a", "top_k": 99}', 422, "top_k 99 is more than the 14 labels"),
    ("/v1/chat/completions", b'{"messages": []}', 422, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "system", "content": "s"}]}', 422, "no user message"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a"}], "n": 2}', 400, "n=2"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 422, "no content"),
    ("/v1/nope", b"{}", 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{s}-{m[:24]}" for _, _, s, m in BAD])
def test_bad_requests_get_their_status_and_message(url, path, body, status, message):
    r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def request_counts(url: str) -> dict[tuple[str, int], float]:
    """qwen_ft_requests_total per (endpoint, code) from /metrics (any label order and number format)."""
    import re

    counts: dict[tuple[str, int], float] = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("qwen_ft_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
            key = (labels["endpoint"], int(labels["code"]))
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_no_bad_request_caused_a_500(url):
    # sends every bad request itself (run alone too), then reads what /metrics counted for them
    before = request_counts(url)
    for path, body, status, _ in BAD:
        r = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, body[:40], r.status_code, r.text[:200])
    after = request_counts(url)
    # what grew, but for the /metrics reads themselves
    grown = {k: n - before.get(k, 0.0) for k, n in after.items() if n != before.get(k, 0.0) and k[0] != "/metrics"}
    sent: dict[tuple[str, int], int] = {}
    per_code: dict[int, int] = {}
    for path, _, status, _ in BAD:
        sent[path, status] = sent.get((path, status), 0) + 1
        per_code[status] = per_code.get(status, 0) + 1
    for (path, status), n in sent.items():
        if path != "/v1/nope":  # an unknown path is counted under a catch-all endpoint name
            assert grown.get((path, status)) == n, (path, status, grown)
    counted: dict[int, float] = {}
    for (_, code), n in grown.items():
        counted[code] = counted.get(code, 0.0) + n
    assert counted == per_code, (counted, per_code)  # each bad request once, under its own code: none as a 500
    assert not any(code >= 500 for (endpoint, code) in after if endpoint != "/health"), after


def test_overload_answers_503_with_retry_after(clf):
    # two texts may wait at a time, and a batch waits 300 ms for company: the others are turned away
    with running(lambda: clf, limits=Limits(max_queue=2, max_wait_ms=300)) as base:
        wait_ready(base)
        responses = asyncio.run(post_all(base, [{"texts": ["a b", "c d"]}] * 12))
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "--max-queue 2" in busy.json()["error"]["message"]


def test_api_key(clf):
    with running(lambda: clf, api_key="s3cret") as base:
        wait_ready(base)  # /health needs no key
        body = {"text": "What is a tort?"}
        assert httpx.post(f"{base}/v1/classify", json=body).status_code == 401
        wrong = httpx.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in wrong.json()["error"]["message"]
        ok = httpx.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).chat.completions.create(
                model="qwen-ft", messages=[{"role": "user", "content": "x"}])
        reply = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0).chat.completions.create(
            model="qwen-ft", messages=[{"role": "user", "content": "What is a tort?"}])
        assert reply.choices[0].message.content == ok.json()["results"][0]["label"]


def test_serve_command_drains_in_flight_requests_on_sigterm(tiny_run):
    port = free_port()
    env = {**os.environ, "QWEN_FT_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_ft", "serve", "--model-path", str(tiny_run), "--port",
                             str(port), "--precision", "fp32", "--max-wait-ms", "1500"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        answer: dict = {}
        worker = threading.Thread(target=lambda: answer.update(
            r=httpx.post(f"{base}/v1/classify", json={"text": "What is a tort?"}, timeout=60)))
        worker.start()
        time.sleep(0.5)  # the request waits 1.5 s in the batcher for company: it is in flight now
        proc.send_signal(signal.SIGTERM)
        worker.join(60)
        assert answer["r"].status_code == 200 and answer["r"].json()["results"][0]["label"]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "model loaded" in log and "Shutting down" in log


def test_multiple_choice_requests_and_their_errors(tiny_qwen3, tmp_path):
    run = tmp_path / "mc"
    assert main(["train", "--model", str(tiny_qwen3), "--data", "demo-mc", "--max-samples", "24", "--epochs", "1",
                 "--batch-size", "8", "--precision", "fp32", "--output-dir", str(run)]) == 0
    mc = Classifier.load(run, precision="fp32")
    row = {"question": "Where do you keep milk cold?", "choices": ["oven", "fridge", "drawer", "car", "roof"]}
    with running(lambda: mc) as base:
        wait_ready(base)
        ok = httpx.post(f"{base}/v1/classify", json={"texts": [row, json.dumps(row)], "top_k": 2})
        assert ok.status_code == 200
        expected = mc.classify([row], top_k=2)[0][0]
        assert [r["label"] for r in ok.json()["results"]] == [expected["pred"]] * 2
        cases = [({"text": "not json"}, "multiple-choice input must be JSON"),
                 ({"text": {"question": "q", "choices": [f"c{i}" for i in range(8)]}}, "1 row(s) with 8 choices"),
                 ({"text": {"question": "q", "choices": ["word " * 400, "other " * 400]}}, "--max-length")]
        for body, message in cases:
            r = httpx.post(f"{base}/v1/classify", json=body)
            assert r.status_code == 422 and message in r.json()["error"]["message"], r.text
        assert 'code="500"' not in httpx.get(f"{base}/metrics").text


def test_the_guard_host_allow_list_api_key_everywhere_json_only_and_no_cors_by_default(clf):
    from qwen_ft.inference.serve_guard import LOOPBACK_NAMES

    key = {"Authorization": "Bearer k"}
    with running(lambda: clf, api_key="k", allowed_hosts=LOOPBACK_NAMES) as base:
        wait_ready(base)
        assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
        for path in ("/metrics", "/openapi.json", "/v1/labels", "/v1/models"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
        assert httpx.get(f"{base}/metrics", headers=key).status_code == 200
        # a page's simple request (text/plain triggers no CORS preflight) is refused
        r = httpx.post(f"{base}/v1/classify", content=b'{"text": "What is a tort?"}',
                       headers={**key, "Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        # DNS rebinding: the browser sends the attacker's name as Host
        r = httpx.post(f"{base}/v1/classify", json={"text": "What is a tort?"}, headers={**key, "Host": "evil.example"})
        assert r.status_code == 421
        r = httpx.post(f"{base}/v1/classify", json={"text": "What is a tort?"},
                       headers={**key, "Origin": "https://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with running(lambda: clf, cors_origins=("https://app.example",)) as base:
        wait_ready(base)
        r = httpx.options(f"{base}/v1/classify", headers={"Origin": "https://app.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_serve_abstains_below_min_confidence_and_counts_it(clf):
    from qwen_ft.inference.serve import Limits

    with running(lambda: clf, limits=Limits(min_confidence=1.0, fallback_label="abstain")) as base:
        wait_ready(base)
        r = httpx.post(f"{base}/v1/classify", json={"texts": ["What is a tort?", "Ribosomes?"]}).json()
        assert all(x["abstained"] and x["label"] == "abstain" and x["model_label"] in clf.labels for x in r["results"])
        assert "qwen_ft_abstentions_total 2" in httpx.get(f"{base}/metrics").text
    with running(lambda: clf, limits=Limits(min_confidence=0.0)) as base:
        wait_ready(base)
        r = httpx.post(f"{base}/v1/classify", json={"text": "What is a tort?"}).json()
        assert r["results"][0]["abstained"] is False and r["results"][0]["label"] in clf.labels
