"""`qwen-ft mcp` over a tiny trained run, driven by the MCP SDK's own client over stdio and streamable HTTP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from qwen_ft.errors import UserError
from qwen_ft.inference.mcp_server import category_info, entropy_bits
from tests.conftest import REPO

TEXTS = ["What is a tort?", "How do cells divide?", "Integrate x dx from 0 to 1.", "Who was Julius Caesar?"]
MAX_CHARS = 200  # the servers below run with --max-chars 200
STARTUP_S = 240  # loading torch and the model on a busy 2-core machine


def env() -> dict:
    return {**os.environ, "QWEN_FT_THREADS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}


def mcp_args(run: Path, *extra: str) -> list[str]:
    return ["-m", "qwen_ft", "mcp", "--model-path", str(run), "--precision", "fp32", "--max-chars", str(MAX_CHARS),
            *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def labels(tiny_run) -> list[str]:
    return json.loads((tiny_run / "label_mapping.json").read_text(encoding="utf-8"))["labels"]


@pytest.fixture(scope="module")
def expected(tiny_run, labels) -> dict[str, dict]:
    """`qwen-ft test`'s answer for each text, with every label's probability (the same exact decoding)."""
    from qwen_ft.commands.predict import run_predict

    out = run_predict(str(tiny_run), TEXTS, top=len(labels), precision="fp32")
    return {r["input"]: r for r in out}


async def exchange(client: Client) -> dict:
    """Everything the tests check, asked over one connection."""
    with anyio.fail_after(STARTUP_S):
        tools = await client.list_tools()
        categories = await client.call_tool("list_categories", {})
        full = {t: await client.call_tool("classify_text", {"text": t, "with_probabilities": True}) for t in TEXTS}
        plain = await client.call_tool("classify_text", {"text": TEXTS[0]})
        errors = {name: await client.call_tool("classify_text", {"text": text}) for name, text in
                  (("empty", ""), ("blank", "  \n "), ("long", "x" * (MAX_CHARS + 1)))}
    return {"tools": tools, "categories": categories, "full": full, "plain": plain, "errors": errors}


def answer(result) -> dict:
    """The tool's JSON answer as semantic-router reads it: the first text content."""
    assert not result.is_error, result.content
    data = json.loads(result.content[0].text)
    assert result.structured_content == data
    return data


def check_exchange(got: dict, labels: list[str], expected: dict[str, dict]) -> None:
    assert {t.name for t in got["tools"].tools} >= {"list_categories", "classify_text"}
    schema = next(t for t in got["tools"].tools if t.name == "classify_text").input_schema
    assert schema["required"] == ["text"] and schema["properties"]["with_probabilities"]["type"] == "boolean"
    assert answer(got["categories"])["categories"] == labels  # class-index order = label_mapping.json's
    for text, result in got["full"].items():
        data = answer(result)
        probs = data["probabilities"]
        assert len(probs) == len(labels) and all(0 <= p <= 1 for p in probs)
        assert abs(sum(probs) - 1) < 1e-6
        assert data["entropy"] == pytest.approx(-sum(p * math.log2(p) for p in probs if p > 0), abs=1e-12)
        assert data["class"] == max(range(len(labels)), key=probs.__getitem__)
        assert data["confidence"] == probs[data["class"]]
        ref = expected[text]  # the same text through `qwen-ft test`, in this process
        assert labels[data["class"]] == ref["label"]
        ref_probs = {ref["label"]: ref["probability"], **dict(ref["alternatives"])}
        assert probs == pytest.approx([ref_probs[lab] for lab in labels], abs=1e-5)
    plain = answer(got["plain"])
    assert "probabilities" not in plain and set(plain) == {"class", "confidence", "entropy"}
    assert plain["class"] == answer(got["full"][TEXTS[0]])["class"]
    for name, result in got["errors"].items():
        assert result.is_error, name
        message = result.content[0].text
        if name == "long":
            assert f"{MAX_CHARS + 1} characters; the limit is {MAX_CHARS}" in message
        else:
            assert "text is empty" in message


def test_stdio(tiny_run, labels, expected, tmp_path):
    params = StdioServerParameters(command=sys.executable, args=mcp_args(tiny_run), env=env(), cwd=tmp_path)
    log = tmp_path / "stderr.log"

    async def run() -> dict:
        with open(log, "w") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                return await exchange(client)

    got = anyio.run(run)
    check_exchange(got, labels, expected)
    assert "category_descriptions" not in answer(got["categories"])
    assert "serving" in log.read_text()  # the log went to stderr, not into the protocol's stdout


def test_streamable_http(tiny_run, labels, expected, tmp_path):
    info = tmp_path / "categories.json"
    info.write_text(json.dumps({"category_descriptions": {labels[1]: "the second one"},
                                "category_system_prompts": {labels[0]: "You are an expert."}}))
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *mcp_args(tiny_run, "--http", "--port", str(port),
                                                           "--category-info", str(info))],
                                env=env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server never answered /health\n" + log.read_text()
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health.json()["status"] == "ok" and health.json()["categories"] == labels

        async def run() -> dict:
            async with Client(f"{base}/mcp") as client:
                return await exchange(client)

        got = anyio.run(run)
        check_exchange(got, labels, expected)
        listing = answer(got["categories"])
        assert listing["category_descriptions"] == {labels[1]: "the second one"}
        assert listing["category_system_prompts"] == {labels[0]: "You are an expert."}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()  # a requested, clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entropy_in_bits_by_hand():
    assert entropy_bits([0.25] * 4) == 2.0
    assert entropy_bits([1.0, 0.0, 0.0]) == 0.0
    assert entropy_bits([0.5, 0.5]) == 1.0
    assert entropy_bits([0.75, 0.25]) == pytest.approx(0.8112781244591328)


def test_category_info_is_checked_against_the_labels():
    labels = ["law", "math"]
    info = category_info({"category_system_prompts": {"math": "Show steps.", "law": "Cite cases."}}, labels, "f")
    assert list(info.system_prompts) == ["law", "math"] and info.descriptions == {}  # class-index order
    with pytest.raises(UserError) as e:
        category_info({"category_descriptions": {"maths": "x", "law": ""}, "prompts": {}}, labels, "f.json")
    assert len(e.value.problems) == 3
    assert "'maths' is not a category of this run" in e.value.message and "unknown key 'prompts'" in e.value.message
    with pytest.raises(UserError, match="expected a JSON object"):
        category_info(["law"], labels, "f.json")
