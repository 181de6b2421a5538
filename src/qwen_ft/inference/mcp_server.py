"""MCP over a Classifier: the two tools of semantic-router's MCP classification servers. Knows MCP, not tokens.

semantic-router (`classifier.mcp_category_model`) calls `list_categories` once, then `classify_text` per request:

* `list_categories` -> `{"categories": [...], "category_descriptions": {...}, "category_system_prompts": {...}}`:
  the labels in class-index order (label_mapping.json's order); the two maps only when given (`CategoryInfo`).
* `classify_text(text, with_probabilities=False)` -> `{"class": i, "confidence": p, "entropy": bits}` plus
  `"probabilities"` (every label's probability, in class-index order) when asked for. `entropy` is the Shannon
  entropy of that distribution in bits, -sum p log2 p. semantic-router's optional `model` / `use_reasoning`
  are routing choices this server does not make, so they are absent; the router applies its own threshold
  (`mcp_category_model.threshold`), so the run's threshold.json is not applied here.

The distribution is every label's probability (`decode="exact"`, or the head of a `--head classification` run),
as `qwen-ft test` scores it, calibrated when the run's calibration.json was fitted for that scoring. Tool errors
(an empty or over-long text, an input the task cannot read) come back as `isError` results with the reason.

Model calls block, so each one runs in a worker thread, one at a time (one lock around the model): the event
loop keeps answering other sessions while a text is scored.
"""

import math
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

from qwen_ft import __version__
from qwen_ft.errors import UserError
from qwen_ft.inference import calibration as calib

# The MCP SDK (a second or so to import) is imported by build_server only: `qwen-ft --help` and the other
# commands never pay for it. No `from __future__ import annotations` here: the tools' annotations name
# classes that build_server imports, so they must be evaluated where the tools are defined.

MAX_CHARS = 20_000  # characters per text: the default of `qwen-ft serve --max-chars`
INFO_KEYS = ("category_descriptions", "category_system_prompts")


@dataclass(frozen=True)
class CategoryInfo:
    """What list_categories adds to the names: per-category descriptions and system prompts (router context)."""

    descriptions: dict[str, str] = field(default_factory=dict)
    system_prompts: dict[str, str] = field(default_factory=dict)


def category_info(data, labels: list[str], source: str) -> CategoryInfo:
    """A CategoryInfo from parsed JSON in list_categories' own shape, `{"category_descriptions": {label: text},
    "category_system_prompts": {label: text}}` (either optional); every problem in one UserError."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with {' and/or '.join(INFO_KEYS)}, "
                        f"got {type(data).__name__}")
    problems = [f"{source}: unknown key {key!r} (known: {', '.join(INFO_KEYS)})" for key in data
                if key not in INFO_KEYS]
    maps = {}
    for key in INFO_KEYS:
        value = data.get(key, {})
        if not isinstance(value, dict):
            problems.append(f"{source}: {key!r} must be an object mapping category names to texts")
            continue
        for name, text in value.items():
            if name not in labels:
                problems.append(f"{source}: {key}: {name!r} is not a category of this run "
                                f"(categories: {', '.join(labels)})")
            elif not isinstance(text, str) or not text.strip():
                problems.append(f"{source}: {key}: {name!r} must map to a non-empty text")
        maps[key] = value
    if problems:
        raise UserError(problems)
    # in class-index order, whatever order the file used
    ordered = {key: {lab: maps[key][lab] for lab in labels if lab in maps[key]} for key in maps}
    return CategoryInfo(ordered["category_descriptions"], ordered["category_system_prompts"])


def entropy_bits(probabilities: list[float]) -> float:
    """Shannon entropy in bits, -sum p log2 p (a label of probability 0 adds nothing)."""
    return 0.0 - sum(p * math.log2(p) for p in probabilities if p > 0)  # 0.0, not -0.0, for a certain answer


class ClassifierTools:
    """The model side of the tools: checks a text, scores it under one lock, shapes the answer. Raises
    UserError for a text it cannot answer (the tools turn it into a tool error)."""

    def __init__(self, classifier, max_chars: int = MAX_CHARS):
        if max_chars < 1:
            raise UserError(f"--max-chars must be >= 1 (got {max_chars})")
        self.classifier = classifier
        self.max_chars = max_chars
        self.decode = "head" if classifier.head else "exact"  # every label's probability, as `qwen-ft test`
        self._lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    def row(self, text: str) -> dict:
        """The engine's row for a tool's text, checked on the way in."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("text is empty: pass the text to classify")
        if len(text) > self.max_chars:
            raise UserError(f"text has {len(text)} characters; the limit is {self.max_chars} (--max-chars)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800" would fail inside the tokenizer
            raise UserError("text is not valid Unicode (it holds an unpaired surrogate)") from None
        row = self.classifier.row(text)
        self.classifier.check_rows([row])
        return row

    def distribution(self, row: dict) -> tuple[int, list[float]]:
        """(class index, every label's probability in class-index order) for one row. Blocking: call it from a
        worker thread. Probabilities come unrounded from the row's scores at the calibration temperature (the
        engine rounds `top` to 6 digits), so they sum to 1 to float precision."""
        clf = self.classifier
        with self._lock:
            results, _ = clf.classify([row], decode=self.decode, top_k=1, batch_size=1)
        res = results[0]
        scores = res["scores"]
        temperature = clf.temperature(self.decode) or 1.0
        by_label = dict(zip(scores["labels"], calib.probabilities(scores, temperature)))
        return self.labels.index(res["pred"]), [float(by_label.get(lab, 0.0)) for lab in self.labels]

    async def classify(self, text: str, with_probabilities: bool = False) -> dict:
        import anyio.to_thread

        row = self.row(text)
        index, probabilities = await anyio.to_thread.run_sync(self.distribution, row)
        out = {"class": index, "confidence": probabilities[index], "entropy": entropy_bits(probabilities)}
        if with_probabilities:
            out["probabilities"] = probabilities
        return out

    def categories(self, info: CategoryInfo | None = None) -> dict:
        out: dict = {"categories": list(self.labels)}
        if info is not None and info.descriptions:
            out["category_descriptions"] = dict(info.descriptions)
        if info is not None and info.system_prompts:
            out["category_system_prompts"] = dict(info.system_prompts)
        return out


def build_server(classifier, *, max_chars: int = MAX_CHARS, info: CategoryInfo | None = None,
                 name: str = "qwen-ft"):
    """An MCPServer with `list_categories` and `classify_text` over a loaded classifier, and `GET /health` on its
    HTTP app (`server.streamable_http_app()`). Serve it with `server.run("stdio")` or that app under uvicorn.
    The SDK's constructor calls logging.basicConfig, which does nothing once the process has configured logging."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from pydantic import Field
    from starlette.responses import JSONResponse

    tools = ClassifierTools(classifier, max_chars)
    names = ", ".join(tools.labels)
    server = MCPServer(name, version=__version__,
                       instructions=f"A fine-tuned text classifier over {len(tools.labels)} categories: {names}. "
                                    "Call list_categories for the class indices, then classify_text.")

    @server.tool(description="List the categories in class-index order (the `class` of classify_text indexes "
                             "`categories`), with descriptions and system prompts where the server has them.")
    async def list_categories() -> dict[str, Any]:
        return tools.categories(info)

    @server.tool(description=f"Classify a text into one of: {names}. Returns class (index into list_categories' "
                             "categories), confidence (its probability) and entropy (bits); with_probabilities "
                             "adds every category's probability in class-index order.")
    async def classify_text(text: Annotated[str, Field(description="The text to classify")],
                            with_probabilities: Annotated[bool, Field(
                                description="Also return every category's probability, in class-index order")] = False,
                            ) -> dict[str, Any]:
        try:
            return await tools.classify(text, with_probabilities)
        except UserError as e:  # the caller's text (or a limit of the run): said plainly, as an isError result
            raise ToolError(e.message) from None

    @server.custom_route("/health", methods=["GET"])
    async def health(request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": name, "categories": tools.labels})

    return server


__all__ = ["MAX_CHARS", "CategoryInfo", "ClassifierTools", "build_server", "category_info", "entropy_bits"]
