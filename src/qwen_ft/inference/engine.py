"""The one inference engine: a trained classifier loaded once, answering `classify(rows)`.

Every consumer goes through `Classifier`: `qwen-ft validate`, `test`, `predict`, `serve` and the study's
evaluation. It knows tokens and labels, not files (`load` reads the folder) or HTTP. A call returns its results
and its statistics; nothing on the object changes per call, so one instance serves concurrent callers.

Rows are normalized task rows: `{"question": ...}` for a category task, `{"question", "choices"}` for
multiple choice (`Classifier.row` builds one from a user's text or JSON). How each decode scores a row, and
what a row's result holds: `qwen_ft.inference.decoding`.

Calibration: each row's result keeps the raw `scores` its softmax is taken over (`qwen_ft.inference.calibration`).
When the folder holds a calibration.json (`qwen-ft validate --calibrate`) fitted for the call's decode and
normalize, `probability` and `top` are softmax(scores / T), `raw_probability` the uncalibrated value;
the prediction never changes.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

from qwen_ft import distributed as dist
from qwen_ft import selective
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import UserError
from qwen_ft.inference import calibration as calib
from qwen_ft.inference.decoding import (
    MAX_PACK_TOKENS_CPU,
    _calibrated,
    _can_pack,
    _margin,
    _one_pass,
    check_args,
    score_batch,
)
from qwen_ft.inference.kernels import Counts, Timer, common_prefix, prefix_cache
from qwen_ft.metrics import classification_report

log = logging.getLogger(__name__)

TIE_MARGIN = {"bf16": 0.5, "fp16": 0.5}  # fp32: batch-invariant to < 1e-6 (measured), off


class Classifier:
    def __init__(self, model, encoder: PromptEncoder, precision: str = "fp32", info: dict | None = None,
                 calibration: dict | None = None):
        self.model = model.eval()
        self.encoder = encoder
        self.precision = precision
        self.info = dict(info or {})
        # calibration.json: {"temperature", "decode", "normalize", ...}, applied to calls with that scoring
        self.calibration = calibration
        self.device = next(model.parameters()).device
        tok = encoder.tok
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else encoder.eot_id
        # padded prompt tokens per batch (rows x longest row): batches of long rows counted by rows alone
        # compute mostly padding, so CPU batches are capped in tokens too (docs/performance.md)
        self.max_batch_tokens = 2048 if self.device.type == "cpu" else 16384
        self.max_pack_tokens = MAX_PACK_TOKENS_CPU  # packing runs on CPU only (_can_pack)
        # rows whose two best answers are closer than this (raw score units: logits or log-probabilities)
        # are scored again alone: see _rescore_close_calls. bf16/fp16 scores of one row move by a few tenths
        # with the batch it shares; fp32 ones do not (docs/performance.md)
        self.tie_margin = TIE_MARGIN.get(precision, 0.0)
        self.can_pack = _can_pack(model, self.device)
        # a classification head (`--head classification`) answers from one pass over the whole prompt
        from qwen_ft.models import is_head_model

        self.head = is_head_model(model)
        if self.head and model.config.num_labels != len(self.labels):
            raise UserError(f"the classification head has {model.config.num_labels} outputs for "
                            f"{len(self.labels)} labels", "Its label_mapping.json must come from the same run.")
        # the instruction every prompt starts with, and its KV cache: computed once, read by every call
        self._prefix = [] if self.head else common_prefix([encoder.prompt_ids(r) for r in self._probe_rows()])
        self._prefix_cache = None if self.head else prefix_cache(self.model, self._prefix, self.device)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path, *, base_model: str | None = None, precision: str = "auto", adapter: bool = True,
             trust_remote_code: bool = False, adapter_scale: float = 1.0) -> Classifier:
        """A run folder (base + adapter, merged into the weights) or a merged model folder (merge.json).

        `adapter=False` scores the base model alone with the run's prompt (the untrained baseline);
        `adapter_scale` multiplies the adapter's update (0: the base, 1: the run; see `check_adapter_scale`).
        The folder's calibration.json and threshold.json apply only at the adapter scale they were fitted at.
        Remote code runs only when `trust_remote_code` is passed here (the command-line flag); a folder
        that recorded it is refused without it, never taken as permission.
        """
        from qwen_ft.inference.load import load_classifier

        return load_classifier(cls, path, base_model=base_model, precision=precision, adapter=adapter,
                               trust_remote_code=trust_remote_code, adapter_scale=adapter_scale)

    threshold: dict | None = None  # threshold.json (validate --fit-threshold), applied by abstention()

    def abstention(self, min_confidence: float | None = None, fallback: str | None = None, decode: str = "auto",
                   normalize: str = "auto") -> selective.Abstention | None:
        """The abstention rule for this scoring: `min_confidence` when given, else the folder's threshold.json
        when it was fitted for the same decode, normalize, temperature and adapter scale; None: never abstain."""
        if min_confidence is not None and not (isinstance(min_confidence, (int, float)) and 0 <= min_confidence <= 1):
            raise UserError(f"--min-confidence must be a probability in [0, 1] (got {min_confidence!r})")
        if fallback is not None and not (isinstance(fallback, str) and fallback.strip()):
            raise UserError("--fallback-label must be a non-empty text")
        fallback = fallback or selective.fallback_label(self.labels)
        if min_confidence is not None:
            return selective.Abstention(float(min_confidence), fallback, "--min-confidence")
        fitted = self.threshold
        if fitted is None or fitted["threshold"] is None:
            return None
        decode, normalize = self.scoring(decode, normalize)
        if (fitted["decode"], fitted["normalize"]) != (decode, normalize):
            log.warning("threshold.json was fitted for --decode %s --normalize %s: not applied to --decode %s "
                        "--normalize %s", fitted["decode"], fitted["normalize"], decode, normalize)
            return None
        now = (self.temperature(decode, normalize), float(self.info.get("adapter_scale", 1.0)))
        then = (fitted.get("temperature"), float(fitted.get("adapter_scale", 1.0)))
        if now != then:
            raise UserError(f"{self.info['model_path']}/threshold.json was fitted at temperature {then[0]} and adapter "
                            f"scale {then[1]:g}; the probabilities now come at {now[0]} and {now[1]:g}",
                            "Fit it again (qwen-ft validate --fit-threshold ...), or pass --min-confidence.")
        return selective.Abstention(float(fitted["threshold"]), fallback, "threshold.json")

    # ------------------------------------------------------------------ what it answers
    @property
    def task(self):
        return self.encoder.task

    @property
    def labels(self) -> list[str]:
        return self.encoder.task.labels

    @property
    def ends_answers(self) -> bool:
        return getattr(self.encoder, "ends_answers", True)

    def row(self, value) -> dict:
        """A normalized row from a user's input: the text itself (category), or a JSON object / dict with
        `question` and `choices` (multiple choice)."""
        if self.task.name != "multiple_choice":
            if isinstance(value, dict):
                value = value.get("question", value.get("text"))
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"the input must be a non-empty text (got {str(value)[:80]!r})")
            return {"question": value}
        row = value
        if isinstance(value, str):
            try:
                row = json.loads(value)
            except json.JSONDecodeError:
                row = None
        if not isinstance(row, dict) or not isinstance(row.get("choices"), list) or \
                not isinstance(row.get("question"), str):
            raise UserError(f'multiple-choice input must be JSON like {{"question": "...", "choices": ["...", '
                            f'"..."]}}; got {str(value)[:80]!r}')
        return {"question": row["question"], "choices": [str(c) for c in row["choices"]]}

    def check_rows(self, rows: list[dict]) -> None:
        """One UserError for rows this classifier cannot answer (too many choices, no text)."""
        if self.task.name == "multiple_choice":
            most = len(self.labels)
            counts = Counter(len(r.get("choices") or []) for r in rows)
            bad = {n: c for n, c in counts.items() if not 2 <= n <= most}
            if bad:
                shown = ", ".join(f"{c} row(s) with {n} choices" for n, c in sorted(bad.items()))
                raise UserError(f"this classifier answers 2 to {most} choices ({', '.join(self.labels)}); got "
                                f"{shown}", f"Score them with a run trained on {max(bad)}-choice questions.")
        missing = sum(not isinstance(r.get("question"), str) for r in rows)
        if missing:
            raise UserError(f"{missing} row(s) have no question text")

    def _probe_rows(self) -> list[dict]:
        if self.task.name == "multiple_choice":
            return [{"question": "a", "choices": ["x", "y"]}, {"question": "b", "choices": ["z", "w"]}]
        return [{"question": "a"}, {"question": "b"}]

    # ------------------------------------------------------------------ classify
    def plan(self, prompts: list[list[int]], prefix_len: int, batch_size: int,
             packed: bool = False) -> list[list[int]]:
        """Row indices batched by length (less padding; fewer rows when they are long). The token cap
        counts what a batch computes: each row's tokens after the shared prefix, padded to the longest, or
        (`packed`: rows that one pass decides, which may run packed) the real ones, at most max_pack_tokens."""
        cap = self.max_pack_tokens if packed else self.max_batch_tokens
        return dist.batch_plan([len(p) - prefix_len for p in prompts], batch_size, cap, packed)

    def scoring(self, decode: str = "auto", normalize: str = "auto") -> tuple[str, str]:
        """'auto' decoding: constrained (fast, always valid) when answers end with an end-of-turn token, else
        exact; 'auto' normalization: per character for plain prompts (lm-evaluation-harness acc_norm, the
        scoring the study reports for them), none otherwise. A classification head: 'head' (its only decode)."""
        if decode == "auto":
            decode = "head" if self.head else "constrained" if self.ends_answers else "exact"
        if normalize == "auto":
            normalize = "char" if decode == "exact" and not self.ends_answers else "none"
        return decode, normalize

    def temperature(self, decode: str = "auto", normalize: str = "auto") -> float | None:
        """The calibration temperature that applies to this scoring (None: raw probabilities)."""
        decode, normalize = self.scoring(decode, normalize)
        cal = self.calibration
        if cal and cal["decode"] == decode and cal["normalize"] == normalize:
            return float(cal["temperature"])
        return None

    def classify(self, rows: list[dict], *, decode: str = "auto", normalize: str = "auto", top_k: int = 1,
                 batch_size: int = 16, progress: bool = False, distributed: bool = False,
                 calibrated: bool = True) -> tuple[list[dict], dict]:
        """(per-row results, statistics of this call). `distributed`: under torchrun each process scores
        every N-th batch of one plan and all processes receive every result, identical for 1..N processes
        (a row meets the same neighbours - padding, shared prefix - whatever the process count).
        `calibrated`: apply the folder's calibration temperature when it was fitted for this scoring."""
        decode, normalize = self.scoring(decode, normalize)
        check_args(decode, normalize, top_k, batch_size, self.head, self.ends_answers)
        self.check_rows(rows)
        temperature = self.temperature(decode, normalize) if calibrated else None
        if not rows:
            return [], {**self._stats(0, 0.0, Counts(), decode, normalize, 0), "memory_per_rank": [],
                        "world_size": dist.world_size() if distributed else 1, "temperature": temperature}
        encoded = [self.encoder.encode_prompt(r) for r in rows]
        prompts = [ids for ids, _ in encoded]
        truncated = sum(cut for _, cut in encoded)
        prefix, cache = self._call_prefix(prompts, decode)
        # rows that one pass decides may run packed (no padding): their batches are capped on real tokens
        packable = decode == "constrained" and self.can_pack and all(
            _one_pass(self.encoder.answer_options(r)[1]) for r in rows)
        batches = self.plan(prompts, len(prefix), batch_size, packed=packable)
        mine = dist.shard(batches) if distributed else list(range(len(batches)))
        # the instruction's cache was computed at load time; a prefix of this call's own is computed now
        counts = Counts(computed_tokens=len(prefix) if cache is not None and cache is not self._prefix_cache else 0)
        results: list[tuple[int, dict]] = []
        with Timer() as timer:
            for b in _progress(mine, progress, len(rows), [len(batches[b]) for b in mine]):
                idx = batches[b]
                counts.prompt_tokens += sum(len(prompts[i]) for i in idx)
                batch = score_batch(self, decode, normalize, top_k, [rows[i] for i in idx],
                                    [prompts[i] for i in idx], prefix, cache, counts, packable)
                results += zip(idx, batch)
            rescored = self._rescore_close_calls(results, rows, decode, normalize, top_k, counts)
        stats = self._stats(len(rows), timer.seconds, counts, decode, normalize, truncated)
        stats["rescored_alone"] = rescored
        if distributed and dist.world_size() > 1:
            results, stats = self._gather_ranks(results, stats)
        else:
            stats["memory_per_rank"] = [dist.peak_memory()]
        stats["world_size"] = dist.world_size() if distributed else 1
        stats["temperature"] = temperature
        ordered: list[dict | None] = [None] * len(rows)
        for i, res in results:
            ordered[i] = res if temperature is None else _calibrated(res, temperature, top_k)
        return ordered, stats

    def evaluate(self, rows: list[dict], *, decode: str = "auto", normalize: str = "auto", top_k: int = 1,
                 batch_size: int = 16, progress: bool = False, distributed: bool = False,
                 fit_temperature: bool = False) -> tuple[dict, list[dict]]:
        """(report, predictions) of labeled rows: the one eval.json schema (classification_report keys +
        decode, normalize, chance, seconds, samples_per_s, tokens, precision, calibration) and one prediction
        per row. `fit_temperature`: fit a calibration temperature on these rows' raw scores and apply it to
        this call's results (report["calibration"]["fit"] holds it; nothing on the classifier changes)."""
        decode, normalize = self.scoring(decode, normalize)
        if fit_temperature and decode == "free":
            raise UserError("--calibrate needs probabilities, and --decode free gives none",
                            "Use --decode constrained or --decode exact.")
        results, stats = self.classify(rows, decode=decode, normalize=normalize, top_k=top_k, batch_size=batch_size,
                                       progress=progress, distributed=distributed, calibrated=not fit_temperature)
        golds = [r["label"] for r in rows]
        temperature, fitted = stats["temperature"], None
        if fit_temperature:
            fitted = calib.fit([r["scores"] for r in results], golds, [r["pred"] == g for r, g in zip(results, golds)])
            temperature = fitted["temperature"]
            results = [_calibrated(r, temperature, top_k) for r in results]
        report = classification_report(golds, [r["pred"] for r in results], self.labels)
        report.update({
            "decode": decode, "normalize": normalize, "chance": chance(self.task, rows),
            "seconds": stats["seconds"], "samples_per_s": stats["samples_per_s"],
            "prompt_tokens": stats["prompt_tokens"], "computed_tokens": stats["computed_tokens"],
            "precision": self.precision, "world_size": stats["world_size"],
            "memory_per_rank": stats["memory_per_rank"], "truncated_prompts": stats["truncated_prompts"],
        })
        # ECE / reliability bins / NLL of the probabilities reported (none under free decoding)
        report["calibration"] = None
        if decode != "free" and rows:
            report["calibration"] = calib.summary([r["scores"] for r in results], golds,
                                                  [r["pred"] == g for r, g in zip(results, golds)], temperature)
            report["calibration"]["fitted_on_these_rows"] = fitted is not None  # then its ECE is optimistic
            if fitted is not None:
                report["calibration"]["fit"] = fitted
        # the risk-coverage curve of the probabilities reported (what --min-confidence and threshold.json compare)
        report["selective"] = None
        if decode != "free" and rows:
            report["selective"] = selective.risk_coverage([r["probability"] for r in results],
                                                          [r["pred"] == g for r, g in zip(results, golds)])
            report["selective"]["temperature"] = temperature
        return report, _predictions(rows, results, top_k)

    # ------------------------------------------------------------------ batch-invariant decisions
    def _rescore_close_calls(self, results: list[tuple[int, dict]], rows: list[dict], decode: str, normalize: str,
                             top_k: int, counts: Counts) -> int:
        """Rows whose top two answers are closer than `tie_margin` are scored again alone, so that every
        label is a function of its row, never of the batch it happened to share.

        In bf16 a row's scores depend on its neighbours (padding length, batch shape: the kernels' rounding
        differs); a server batches whatever arrives together, `predict` sorts by length, so a near-tie could
        go either way in one and the other. A row alone is always computed the same way, and a row whose
        margin exceeds the batch noise gets the same label in any batch. Hand-written: no maintained CPU
        kernel library offers batch-invariant bf16 matmul/attention. Returns the number of rows rescored.
        """
        margin_floor = self.tie_margin
        if not margin_floor or len(rows) < 2 or decode == "free":
            return 0
        n = 0
        for j, (i, res) in enumerate(results):
            if _margin(res) < margin_floor:
                alone, st = self.classify([rows[i]], decode=decode, normalize=normalize, top_k=top_k, batch_size=1,
                                          calibrated=False)
                counts.prompt_tokens += st["prompt_tokens"]
                counts.computed_tokens += st["computed_tokens"]
                results[j] = (i, alone[0])
                n += 1
        return n

    # ------------------------------------------------------------------ internals
    def _gather_ranks(self, results: list[tuple[int, dict]], stats: dict) -> tuple[list[tuple[int, dict]], dict]:
        """Every process's (row index, result) pairs and the statistics of the whole call, on every process."""
        parts = dist.gather_objects({"results": results, "stats": stats, "memory": dist.peak_memory()})
        counts = Counts(sum(p["stats"]["prompt_tokens"] for p in parts),
                        sum(p["stats"]["computed_tokens"] for p in parts))
        merged = self._stats(stats["rows"], max(p["stats"]["seconds"] for p in parts), counts, stats["decode"],
                             stats["normalize"], stats["truncated_prompts"])
        merged["memory_per_rank"] = [p["memory"] for p in parts]
        merged["rescored_alone"] = sum(p["stats"]["rescored_alone"] for p in parts)
        return [pair for p in parts for pair in p["results"]], merged

    def _call_prefix(self, prompts: list[list[int]], decode: str):
        """The prefix shared by this call's prompts and its cache (the instruction's, computed once, when
        every prompt starts with it)."""
        if decode in ("free", "head"):
            return [], None
        p = self._prefix
        if p and all(len(q) > len(p) and q[: len(p)] == p for q in prompts):
            return p, self._prefix_cache
        prefix = common_prefix(prompts)
        return prefix, prefix_cache(self.model, prefix, self.device)

    @staticmethod
    def _stats(n: int, seconds: float, counts: Counts, decode: str, normalize: str, truncated: int) -> dict:
        return {"rows": n, "seconds": round(seconds, 3),
                "samples_per_s": round(n / seconds, 3) if seconds > 0 else None,
                "prompt_tokens": counts.prompt_tokens, "computed_tokens": counts.computed_tokens,
                "decode": decode, "normalize": normalize, "truncated_prompts": truncated}


def _progress(batches: list[int], enabled: bool, total_rows: int, sizes: list[int]):
    """Batch indices, with a tqdm bar counting rows when enabled."""
    if not enabled:
        yield from batches
        return
    from tqdm.auto import tqdm

    with tqdm(total=sum(sizes), unit="row", dynamic_ncols=True, mininterval=0.5) as bar:
        for b, size in zip(batches, sizes):
            yield b
            bar.update(size)


def _predictions(rows: list[dict], results: list[dict], top_k: int) -> list[dict]:
    """One prediction per labeled row, as eval/predictions.jsonl holds them."""
    predictions = []
    for row, res in zip(rows, results):
        pred = {"id": row.get("id"), "label": row["label"], "pred": res["pred"],
                "probability": res["probability"], "raw_probability": res["raw_probability"],
                "correct": res["pred"] == row["label"], "valid": res["valid"]}
        if top_k > 1:
            pred["top"] = res["top"]
        if "output" in res:
            pred["output"] = res["output"]
        predictions.append(pred)
    return predictions


def chance(task, rows: list[dict]) -> float:
    """Expected accuracy of a uniform guess among each row's allowed labels."""
    return sum(1 / len(task.row_labels(r)) for r in rows) / len(rows) if rows else 0.0


def stderr_is_terminal() -> bool:
    """Progress bars only for a person watching (not in logs, pipes or tests)."""
    try:
        return os.isatty(2)
    except OSError:
        return False


__all__ = ["Classifier", "chance", "stderr_is_terminal"]
