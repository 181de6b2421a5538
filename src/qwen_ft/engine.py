"""The one inference engine: a trained classifier loaded once, answering `classify(rows)`.

Every consumer goes through `Classifier`: `qwen-ft validate`, `test`, `predict`, `serve` and the study's
evaluation. It knows tokens and labels, not files (beyond loading) or HTTP. A call returns its results
and its statistics; nothing on the object changes per call, so one instance serves concurrent callers.

Rows are normalized task rows: `{"question": ...}` for a category task, `{"question", "choices"}` for
multiple choice (`Classifier.row` builds one from a user's text or JSON).

Decoding (`decode=`):
* `constrained` (default): greedy over the row's answers' token trie, the shared instruction computed
  once. `probability` is that of the chosen first answer token, renormalized over the row's distinct
  first tokens; answers that start with the same token share its probability in `top`.
* `exact`: each answer's full log-probability; `probability`/`top` are the softmax over the row's
  answers of the log-probabilities, optionally normalized (`normalize=`): `token` divides by the
  number of answer tokens (end of turn included), `char` by the number of characters of the answer
  text as written after the prompt (lm-evaluation-harness `acc_norm`).
* `free`: greedy text, valid only when it equals an answer.
* `head`: the only decode of a `--head classification` run (`auto` picks it): one pass over each left-padded
  prompt; `probability`/`top` are the softmax of the head's logits over the labels.

Calibration: each row's result keeps the raw `scores` its softmax is taken over (`qwen_ft.calibration`).
When the folder holds a calibration.json (`qwen-ft validate --calibrate`) fitted for the call's decode and
normalize, `probability` and `top` are softmax(scores / T), `raw_probability` the uncalibrated value;
the prediction never changes.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch

from qwen_ft import attention, selective
from qwen_ft import calibration as calib
from qwen_ft import distributed as dist
from qwen_ft.encoding import PromptEncoder, check_head_prompt
from qwen_ft.errors import UserError
from qwen_ft.metrics import classification_report
from qwen_ft.scoring import (
    Counts,
    Timer,
    common_prefix,
    generate_texts,
    greedy_trie,
    left_pad,
    match_answer,
    option_logprobs,
    packed_pass,
    prefix_cache,
    suffix_pass,
)

log = logging.getLogger(__name__)

DECODES = ("auto", "constrained", "exact", "free", "head")
TIE_MARGIN = {"bf16": 0.5, "fp16": 0.5}  # fp32: batch-invariant to < 1e-6 (measured), off
NORMALIZE = ("auto", "none", "token", "char")
# Pack a batch (no padding; scoring.packed_pass) when padding it would cost more than this x its real tokens.
# Measured (SmolLM2-135M bf16, MMLU-Pro questions, AMD EPYC 2 cores): random groups of 8 - padded ~2x the real
# tokens - 4.9 rows/s padded vs 10.6 packed; length-sorted groups of 8 11.4 padded vs 9.7 packed (a packed
# row's attention spans the whole pack).
PACK_ABOVE_PADDING = 1.25
# Real tokens per packed batch on CPU. Under sdpa (or the attention before it knew segments) a pack's attention
# scores every token against the whole pack: packs of 2048 tokens (the padded cap) validated at 12.1 rows/s vs
# 18.1 never packing (56 rows, batch 16, one process, interleaved); 200 rows: never 22.6, packs of 1024 22.9,
# 768 24.2, 512 28.7, 384 27.4. With qwen-ft's attention scoring each segment alone (attention.SEGMENTS) the
# cap matters less; measured again then: never 26.3, 512 25.2, 1024 24.9, 2048 23.0 (run-to-run noise ~10 %).
MAX_PACK_TOKENS_CPU = 512


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
        # padded prompt tokens per batch (rows x longest row): sorted MMLU-Pro prompts (66-508 tokens) in
        # batches of 32 computed 2.9x the useful tokens; capped at 2048 on CPU, validation ran 2.5x faster
        self.max_batch_tokens = 2048 if self.device.type == "cpu" else 16384
        self.max_pack_tokens = MAX_PACK_TOKENS_CPU  # packing runs on CPU only (_can_pack)
        # rows whose two best answers are closer than this (raw score units: logits or log-probabilities)
        # are scored again alone: see _rescore_close_calls. bf16/fp16 scores of one row moved by up to
        # 0.26 between batch compositions (SmolLM2-135M, Xeon AMX); fp32 probabilities agreed to 1e-6
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
        from qwen_ft.models import (
            check_adapter_matches,
            load_adapter,
            load_config,
            load_model,
            load_tokenizer,
            require_trust,
            resolve_model,
        )
        from qwen_ft.precision import inference_dtype, resolve_precision
        from qwen_ft.runs import RunDir
        from qwen_ft.tasks import Task

        folder = Path(path)
        merged = (folder / "merge.json").is_file() and (folder / "label_mapping.json").is_file()
        check_adapter_scale(adapter_scale, merged, adapter)
        if not merged:
            RunDir(folder).require_complete()
        elif not adapter:
            raise UserError(f"{folder} is a merged model: it has no separate adapter to leave out",
                            "Pass the run folder it was merged from to score the base model alone.")
        cfg = RunDir(folder).config()
        require_trust(folder, cfg.model.trust_remote_code, trust_remote_code)
        prec = resolve_precision(precision)
        dtype = inference_dtype(prec)
        tokenizer = load_tokenizer(str(folder), trust_remote_code, padding_side="left")
        mapping = RunDir(folder).label_mapping()  # checked (shape, and labels against the run's splits)
        head = {}  # a classification-head run: the base with a head over the run's labels, the adapter's trained one
        if cfg.model.head == "classification":
            if not adapter:
                raise UserError(f"{folder} was trained with --head classification: its head starts random, so the "
                                "base model alone has no meaningful baseline", "Score the run with its adapter.")
            head = {"labels": mapping["labels"], "pad_token_id": tokenizer.pad_token_id}
        if merged:
            model_path = str(folder)
            model = load_model(model_path, dtype, dist.device(), cfg.model.attn_implementation, trust_remote_code,
                               **head)
        else:
            model_path = resolve_model(base_model or cfg.model.model)
            check_adapter_matches(folder, load_config(model_path, trust_remote_code))
            model = load_model(model_path, dtype, dist.device(), cfg.model.attn_implementation, trust_remote_code,
                               **head)
            if adapter:
                model = load_adapter(model, folder, merge=True, scale=adapter_scale)
        encoder = PromptEncoder(tokenizer, Task.from_mapping(mapping), cfg.model.max_length)
        info = {"model_path": str(folder), "kind": "merged" if merged else "run", "base_model": model_path,
                "adapter": adapter, "precision": prec, "adapter_scale": adapter_scale}
        if dtype in (torch.bfloat16, torch.float16) and not head:
            fp32_logits(model)
        calibration = RunDir(folder).calibration() if adapter else None  # fitted for the adapter's scores
        if calibration and float(calibration.get("adapter_scale", 1.0)) != adapter_scale:
            log.warning("calibration.json was fitted at adapter scale %g, not %g: probabilities are raw",
                        calibration.get("adapter_scale", 1.0), adapter_scale)
            calibration = None
        if calibration:
            log.info("calibration.json: temperature %.4g for --decode %s --normalize %s",
                     calibration["temperature"], calibration["decode"], calibration["normalize"])
        clf = cls(model, encoder, prec, info, calibration)
        clf.threshold = RunDir(folder).threshold() if adapter else None
        return clf

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
        self._check_args(decode, normalize, top_k, batch_size)
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
                batch = self._batch(decode, normalize, top_k, [rows[i] for i in idx], [prompts[i] for i in idx],
                                    prefix, cache, counts, packable)
                results += zip(idx, batch)
            rescored = self._rescore_close_calls(results, rows, decode, normalize, top_k, counts)
        stats = self._stats(len(rows), timer.seconds, counts, decode, normalize, truncated)
        stats["rescored_alone"] = rescored
        if distributed and dist.world_size() > 1:
            parts = dist.gather_objects({"results": results, "stats": stats, "memory": dist.peak_memory()})
            results = [pair for p in parts for pair in p["results"]]
            counts = Counts(sum(p["stats"]["prompt_tokens"] for p in parts),
                            sum(p["stats"]["computed_tokens"] for p in parts))
            stats = self._stats(len(rows), max(p["stats"]["seconds"] for p in parts), counts, decode, normalize,
                                truncated)
            stats["memory_per_rank"] = [p["memory"] for p in parts]
            stats["rescored_alone"] = sum(p["stats"]["rescored_alone"] for p in parts)
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
        return report, predictions

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
    def _check_args(self, decode: str, normalize: str, top_k: int, batch_size: int) -> None:
        if decode not in DECODES:
            raise UserError(f"decode must be one of {', '.join(DECODES)} (got {decode!r})")
        if normalize not in NORMALIZE:
            raise UserError(f"normalize must be one of {', '.join(NORMALIZE)} (got {normalize!r})")
        if self.head != (decode == "head"):
            if self.head:
                raise UserError(f"--decode {decode} scores written answers, and this run has a classification head "
                                "(--head classification), which writes none", "Use --decode head (or auto).")
            raise UserError("--decode head applies to runs trained with --head classification, and this one "
                            "writes its answers", "Use --decode auto, constrained or exact.")
        if decode == "head" and normalize != "none":
            raise UserError(f"--normalize {normalize} applies to --decode exact, not to a classification head",
                            "Leave --normalize at auto.")
        if normalize != "none" and decode != "exact":
            raise UserError(f"--normalize {normalize} applies to --decode exact (each answer's full "
                            f"log-probability), not to --decode {decode}", "Add --decode exact.")
        if decode not in ("exact", "head") and not self.ends_answers:
            raise UserError(f"--decode {decode} needs answers that end with an end-of-turn token, and this "
                            "run's answers carry none (one answer may be the start of another)",
                            "Use --decode exact.")
        if not isinstance(top_k, int) or top_k < 1:
            raise UserError(f"top-k must be >= 1 (got {top_k})")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"--batch-size must be > 0 (got {batch_size})")

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

    def _batch(self, decode, normalize, top_k, rows, prompts, prefix, cache, counts, packable=False) -> list[dict]:
        if decode == "free":
            return self._free(rows, prompts, counts)
        if decode == "head":
            return self._head(prompts, top_k, counts)
        opts = [self.encoder.answer_options(r) for r in rows]
        suffixes = [p[len(prefix):] for p in prompts]
        seqs = [s for _, s in opts]
        if decode == "exact":
            logp = option_logprobs(self.model, suffixes, seqs, len(prefix), cache, self.pad_id, self.device, counts)
            out = []
            for k, (labels, options) in enumerate(opts):
                scores = logp[k, : len(labels)].double()
                if normalize == "token":
                    scores = scores / torch.tensor([len(s) for s in options], dtype=torch.float64)
                elif normalize == "char":
                    # as written after the prompt: with the leading space of template-less prompts, as
                    # lm-evaluation-harness counts its continuation (" " + answer)
                    lead = 0 if self.encoder.has_template else 1
                    chars = [max(1, lead + len(self.task.answer(rows[k], lab))) for lab in labels]
                    scores = scores / torch.tensor(chars, dtype=torch.float64)
                res = _ranked(labels, torch.softmax(scores, -1).tolist(), top_k)
                res["scores"] = {"labels": list(labels), "values": scores.tolist(),
                                 "groups": list(range(len(labels)))}
                out.append(res)
            return out
        if packable and len(suffixes) * max(map(len, suffixes)) > PACK_ABOVE_PADDING * sum(map(len, suffixes)):
            # one pass decides every row, and padding would more than PACK_ABOVE_PADDING x the work: no padding
            logits, kv, mask, lengths = packed_pass(self.model, suffixes, len(prefix), cache, self.device,
                                                    counts), None, None, None
        else:
            logits, kv, mask, lengths = suffix_pass(self.model, suffixes, len(prefix), cache, self.pad_id,
                                                  self.device, counts)
        chosen = greedy_trie(self.model, logits, seqs, kv, mask, lengths, self.device, counts)
        out = []
        for k, (labels, options) in enumerate(opts):
            first_ids = sorted({s[0] for s in options})
            first_logits = logits[k, first_ids].double()
            p = torch.softmax(first_logits, -1).tolist()
            by_token = dict(zip(first_ids, p))
            probs = [by_token[s[0]] for s in options]
            res = _ranked(labels, probs, top_k, first=chosen[k])
            logit_of = dict(zip(first_ids, first_logits.tolist()))
            res["scores"] = {"labels": list(labels), "values": [logit_of[s[0]] for s in options],
                             "groups": [s[0] for s in options]}
            out.append(res)
        return out

    @torch.inference_mode()
    def _head(self, prompts, top_k, counts) -> list[dict]:
        """A classification head's softmax over the labels. Left-padded, so every row's last prompt token is the
        last column, which is the token the model pools: the last one that is not the pad id (prompts never
        end with it: `check_head_prompt`)."""
        ids, mask = left_pad([check_head_prompt(p, self.model.config.pad_token_id) for p in prompts], self.pad_id,
                             self.device)
        counts.computed_tokens += int(mask.sum())
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                            use_cache=False).logits.double().cpu()
        out = []
        for row_logits in logits:
            res = _ranked(self.labels, torch.softmax(row_logits, -1).tolist(), top_k)
            res["scores"] = {"labels": list(self.labels), "values": row_logits.tolist(),
                             "groups": list(range(len(self.labels)))}
            out.append(res)
        return out

    def _free(self, rows, prompts, counts) -> list[dict]:
        tok, task = self.encoder.tok, self.task
        stop = list({self.encoder.eot_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        longest = max(self.encoder.answer_len(r) for r in rows)
        texts = generate_texts(self.model, tok, prompts, longest + 2, stop, self.pad_id, self.device, counts)
        out = []
        for row, text in zip(rows, texts):
            pred = match_answer(text, {lab: task.answer(row, lab) for lab in task.row_labels(row)})
            out.append({"pred": pred, "probability": None, "raw_probability": None, "top": [], "valid": pred is not None,
                        "output": text})
        return out

    @staticmethod
    def _stats(n: int, seconds: float, counts: Counts, decode: str, normalize: str, truncated: int) -> dict:
        return {"rows": n, "seconds": round(seconds, 3),
                "samples_per_s": round(n / seconds, 3) if seconds > 0 else None,
                "prompt_tokens": counts.prompt_tokens, "computed_tokens": counts.computed_tokens,
                "decode": decode, "normalize": normalize, "truncated_prompts": truncated}


class _Fp32Head(torch.nn.Module):
    """The output projection in fp32 over bf16/fp16 hidden states. In bf16 the logits themselves are
    rounded to 8 significant bits (steps of 0.125-0.25 at the magnitudes labels score), so two answers
    could tie by rounding alone; the projection runs on the few positions scored, so fp32 costs little."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)


def fp32_logits(model) -> None:
    """Swap a loaded (inference-only) model's output projection for an fp32 one."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        model.set_output_embeddings(_Fp32Head(head.weight, head.bias))


def check_adapter_scale(scale, merged: bool, adapter: bool) -> None:
    """--adapter-scale: a number in [0, 1] (0 the base model, 1 the trained run), for a run folder's adapter."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
        raise UserError(f"--adapter-scale must be a number in [0, 1] (got {scale!r})",
                        "0 scores the base model, 1 the trained run, values between interpolate.")
    if scale != 1.0 and merged:
        raise UserError("--adapter-scale applies to a run folder, and this is a merged model (its adapter is "
                        "already in the weights)", "Pass the run folder, or merge it with --adapter-scale.")
    if scale != 1.0 and not adapter:
        raise UserError("--adapter-scale scales the adapter, and --baseline leaves it out", "Drop one of them.")


def _can_pack(model, device) -> bool:
    """Whether batches may run packed (`scoring.packed_pass`): on CPU (where it was measured), with sdpa
    attention (it takes the boolean 4D mask as given; eager attention would add it, flash-attention kernels
    take none) or qwen-ft's CPU attention where it honours the segment lengths (`attention.packs`), and only
    full attention in every layer (a sliding window or a recurrent/linear-attention layer would see across
    the packed rows)."""
    impl = getattr(model.config, "_attn_implementation", None)
    return device.type == "cpu" and ((impl == "sdpa" and attention.full_attention_only(model.config))
                                     or (impl == attention.NAME and attention.packs(model)))


def _one_pass(options: list[list[int]]) -> bool:
    """Whether the first pass decides among these answers (their first tokens all differ)."""
    return len({o[0] for o in options}) == len(options)


def _margin(res: dict) -> float:
    """Raw score of the best answer minus the runner-up's, over distinct scores (answers that share a first
    token share one score under constrained decoding); infinite when one answer stands alone."""
    scores = res.get("scores")
    if not scores:
        return float("inf")
    best: dict = {}
    for group, value in zip(scores["groups"], scores["values"]):
        best[group] = max(value, best.get(group, float("-inf")))
    top = sorted(best.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def _ranked(labels: list[str], probs: list[float], top_k: int, first: int | None = None) -> dict:
    """Result of one row from its answers' probabilities; `first` forces the prediction (greedy trie)."""
    order = sorted(range(len(labels)), key=lambda j: (j != first, -probs[j], j))
    best = order[0]
    p = round(float(probs[best]), 6)
    return {"pred": labels[best], "probability": p, "raw_probability": p,
            "top": [[labels[j], round(float(probs[j]), 6)] for j in order[:top_k]], "valid": True}


def _calibrated(res: dict, temperature: float, top_k: int) -> dict:
    """A row's result with `probability` and `top` at `temperature`; its prediction (kept first, whatever
    rounding does to near-ties) and `raw_probability` stay as scored."""
    scores = res["scores"]
    labels = scores["labels"]
    ranked = _ranked(labels, calib.probabilities(scores, temperature), top_k, first=labels.index(res["pred"]))
    return {**res, "probability": ranked["probability"], "top": ranked["top"]}


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


def chance(task, rows: list[dict]) -> float:
    """Expected accuracy of a uniform guess among each row's allowed labels."""
    return sum(1 / len(task.row_labels(r)) for r in rows) / len(rows) if rows else 0.0


def stderr_is_terminal() -> bool:
    """Progress bars only for a person watching (not in logs, pipes or tests)."""
    try:
        return os.isatty(2)
    except OSError:
        return False


__all__ = ["DECODES", "NORMALIZE", "Classifier", "chance", "stderr_is_terminal"]
