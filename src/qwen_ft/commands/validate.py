"""`qwen-ft validate`: score a run on its validation/test split or on any labeled data set, and report."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from qwen_ft import distributed as dist
from qwen_ft.errors import Problems, UserError
from qwen_ft.inference import calibration
from qwen_ft.inference.engine import Classifier, stderr_is_terminal
from qwen_ft.metrics import write_confusion
from qwen_ft.outputs import output_folder
from qwen_ft.runs import RunDir

log = logging.getLogger(__name__)


def load_data_rows(source: str, task_name: str, text_column: str | None = None, label_column: str | None = None,
                   hub_split: str | None = None, slice_columns: tuple[str, ...] = ()) -> list[dict]:
    """Labeled rows of any data set, read and normalized exactly as training reads its data."""
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import load_rows

    data = DataArgs(data=source, hub_split=hub_split, text_column=text_column, label_column=label_column)
    _, rows, dropped = load_rows(source, task_name, data, "row", slice_columns=slice_columns)
    if dropped:
        log.warning("dropped %d rows without text or label from %s", dropped, source)
    return rows


def known_label_rows(rows: list[dict], labels: list[str], skip: bool) -> tuple[list[dict], dict[str, int]]:
    """Rows whose gold label the run knows; others are one error, or (with `skip`) counted and left out."""
    unknown = Counter(r["label"] for r in rows if r["label"] not in set(labels))
    if unknown and not skip:
        listed = ", ".join(f"{lab!r} ({n})" for lab, n in unknown.most_common())
        raise UserError(f"{sum(unknown.values())} of {len(rows)} rows have labels this run does not know: {listed}; "
                        f"the run knows {', '.join(labels)}",
                        "Map them to the run's labels, pick the right --label-column, or pass "
                        "--skip-unknown-labels to score the other rows and count these separately.")
    return [r for r in rows if r["label"] not in unknown], dict(unknown.most_common())


def slice_keys(rows: list[dict], columns: list[str], split_by: str | None, from_split: bool) -> dict[str, list[str]]:
    """Each --slice-by column's value per row: from --data's columns, or (a run's split) its --split-by groups,
    the only column its split files keep."""
    out = {}
    for col in columns:
        if from_split:
            if col != split_by:
                raise UserError(f"--slice-by {col}: a run's split files keep only the --split-by column "
                                f"({split_by or 'none for this run'})", "Pass --data FILE to slice by its columns.")
            out[col] = [str(r.get("group", "(none)")) for r in rows]
        else:
            out[col] = [r["slices"][col] for r in rows]
    return out


def quality_sections(clf: Classifier, rows: list[dict], predictions: list[dict], columns: dict[str, list[str]]) -> dict:
    """eval.json's "slices": per --slice-by column and always per question-length band (tokens)."""
    from qwen_ft.metrics import length_band, slice_report

    golds, preds = [r["label"] for r in rows], [p["pred"] for p in predictions]
    tok = clf.encoder.tok
    bands = [length_band(len(tok(r["question"], add_special_tokens=False)["input_ids"])) for r in rows]
    return {"question_tokens": slice_report(bands, golds, preds),
            **{col: slice_report(keys, golds, preds) for col, keys in columns.items()}}


def fit_abstention(model_path: str, report: dict, predictions: list[dict], target: float, adapter_scale: float) -> dict:
    """threshold.json from the scored rows: the lowest probability threshold whose covered rows reach `target`."""
    from qwen_ft import selective

    fitted = selective.fit_threshold([p["probability"] for p in predictions], [p["correct"] for p in predictions],
                                     target)
    record = {**fitted, "fitted_on": report["data"], "decode": report["decode"], "normalize": report["normalize"],
              "temperature": report["selective"]["temperature"], "adapter_scale": adapter_scale}
    report["threshold"] = record
    if fitted["threshold"] is None:
        raise UserError(f"no confidence threshold reaches accuracy {target:g} on these {fitted['n']} rows (accuracy "
                        f"{fitted['full_coverage_accuracy']:.4f} at full coverage, "
                        f"{report['selective']['curve'][0]['accuracy']:.4f} on the 1 % most confident); "
                        "eval.json was written, threshold.json was not", "Pass a lower --target-accuracy.")
    path = RunDir(model_path).write_threshold(record)
    log.info("threshold %.6f: covers %.1f%% of the rows at accuracy %.4f (target %g); wrote %s", fitted["threshold"],
             100 * fitted["coverage"], fitted["covered_accuracy"], target, path)
    return record


def check_flags(model_path: str, *, batch_size: int, num_samples: int | None, decode: str, normalize: str,
                data: str | None, data_columns: tuple, calibrate: bool, baseline: bool, perturb: str | None,
                perturb_seed: int | None, fit_threshold: bool, target_accuracy: float | None):
    """Every problem with the flags and the folder at once; returns (the parsed --perturb or None, the run, or
    None for a merged model folder)."""
    from qwen_ft.inference.load import is_merged_folder
    from qwen_ft.perturb import parse_perturbation

    p = Problems()
    p.check(batch_size > 0, f"--batch-size must be > 0 (got {batch_size})")
    p.check(num_samples is None or num_samples > 0, f"--num-val-samples must be > 0 (got {num_samples})")
    p.check(normalize in ("none", "auto") or decode in ("exact", "auto"),
            f"--normalize {normalize} applies to --decode exact")
    p.check(data is not None or not any(data_columns), "--text-column/--label-column/--hub-split apply to --data")
    p.check(not calibrate or decode != "free", "--calibrate needs probabilities, and --decode free gives none")
    p.check(not calibrate or not baseline, "--calibrate fits the run's own model, not the --baseline")
    p.check(not calibrate or perturb is None, "--calibrate fits on the rows as they are, not on --perturb noise")
    if calibrate:
        p.attempt(RunDir(model_path).check_calibration_writable)
    p.check(fit_threshold == (target_accuracy is not None), "--fit-threshold and --target-accuracy go together")
    p.check(target_accuracy is None or 0 < target_accuracy <= 1,
            f"--target-accuracy must be in (0, 1] (got {target_accuracy})")
    p.check(not fit_threshold or decode != "free", "--fit-threshold needs probabilities, and --decode free gives none")
    p.check(not fit_threshold or not baseline, "--fit-threshold fits the run's own model, not the --baseline")
    if fit_threshold:
        p.attempt(RunDir(model_path).check_threshold_writable)
    perturbation = p.attempt(parse_perturbation, perturb) if perturb is not None else None
    p.check(perturb is not None or perturb_seed is None, "--perturb-seed applies to --perturb")
    run = None if is_merged_folder(model_path) else p.attempt(RunDir(model_path).require_complete)
    p.raise_if_any()
    return perturbation, run


def rows_to_score(clf: Classifier, run: RunDir | None, model_path: str, split: str, data: str | None,
                  data_columns: tuple, slice_by: tuple[str, ...], skip_unknown_labels: bool):
    """(rows, unknown labels left out): --data read as training reads it, or the run's split."""
    if data is not None:
        rows = load_data_rows(data, clf.task.name, *data_columns, slice_by)
    elif run is None:
        raise UserError(f"{model_path} is a merged model folder, which holds no splits", "Pass --data FILE.")
    else:
        run.warn_if_data_changed(f"--split {split}")
        rows = run.split(split)
    clf.check_rows(rows)  # e.g. more choices than the run has letters: before the label check, clearer
    rows, skipped = known_label_rows(rows, clf.labels, skip_unknown_labels)
    if not rows:
        raise UserError(f"no rows to score in {data or f'the {split} split of {model_path}'}",
                        "Use --split validation or --split test, or another --data.")
    return rows, skipped


def write_eval_folder(model_path: str, out_dir: Path, clf: Classifier, rows: list[dict], report: dict,
                      predictions: list[dict], calibrate: bool, target_accuracy: float | None,
                      adapter_scale: float) -> Path:
    """The eval folder (eval.json last: it marks a whole evaluation), calibration.json with --calibrate and
    threshold.json with a --target-accuracy; returns eval.json's path."""
    run = RunDir(model_path)
    run.start_eval(out_dir)
    write_confusion([r["label"] for r in rows], [p["pred"] for p in predictions], clf.labels, out_dir)
    if report["calibration"]:
        calibration.write_reliability(report["calibration"], out_dir / "reliability.png")
    if calibrate:
        log.info("wrote %s", run.write_calibration(calibration.record(report)))
    path = run.write_eval(out_dir, report, predictions)
    log.info(summary_table(report, clf.labels))
    if target_accuracy is not None:
        fit_abstention(model_path, report, predictions, target_accuracy, adapter_scale)
        run.write_eval(out_dir, report)
    return path


def run_validate(model_path: str, split: str = "validation", num_samples: int | None = None,
                 decode: str = "auto", batch_size: int = 16, output_dir: str | None = None,
                 base_model: str | None = None, precision: str = "auto", gpu_id: int | None = None,
                 baseline: bool = False, data: str | None = None, text_column: str | None = None,
                 label_column: str | None = None, hub_split: str | None = None, skip_unknown_labels: bool = False,
                 normalize: str = "auto", trust_remote_code: bool = False, perturb: str | None = None,
                 perturb_seed: int | None = None, calibrate: bool = False, slice_by: list[str] | None = None,
                 fit_threshold: bool = False, target_accuracy: float | None = None,
                 adapter_scale: float = 1.0) -> dict:
    from qwen_ft.perturb import perturb_rows

    dist.select_gpu(gpu_id)
    data_columns = (text_column, label_column, hub_split)
    perturbation, run = check_flags(
        model_path, batch_size=batch_size, num_samples=num_samples, decode=decode, normalize=normalize, data=data,
        data_columns=data_columns, calibrate=calibrate, baseline=baseline, perturb=perturb, perturb_seed=perturb_seed,
        fit_threshold=fit_threshold, target_accuracy=target_accuracy)
    slice_by = list(dict.fromkeys(slice_by or []))
    # by default each kind of evaluation has its own folder: a noisy or baseline eval never replaces the clean one
    kind = "eval" + ("-baseline" if baseline else "") + (f"-{perturbation.kind}-{perturbation.rate:g}" if perturbation else "")
    out_dir = output_folder(Path(output_dir) if output_dir else Path(model_path) / kind, output_dir is not None)

    dist.init()
    clf = Classifier.load(model_path, base_model=base_model, precision=precision, adapter=not baseline,
                          trust_remote_code=trust_remote_code, adapter_scale=adapter_scale)
    rows, skipped = rows_to_score(clf, run, model_path, split, data, data_columns, tuple(slice_by), skip_unknown_labels)
    rows = rows[:num_samples] if num_samples else rows
    columns = slice_keys(rows, slice_by, None if run is None else run.config().data.split_by, data is None)
    noise = None
    if perturbation is not None:  # the question text only: labels and choices stay as they are
        rows, noise = perturb_rows(rows, perturbation, perturb_seed or 0)

    report, predictions = clf.evaluate(rows, decode=decode, normalize=normalize, batch_size=batch_size,
                                       progress=dist.is_main() and stderr_is_terminal(), distributed=True,
                                       fit_temperature=calibrate)
    if not dist.is_main():
        return {}
    report.update({"data": data or f"split:{split}", "split": None if data else split, "baseline": baseline,
                   "model_path": str(model_path)})
    report["adapter_scale"] = adapter_scale
    report["slices"] = quality_sections(clf, rows, predictions, columns)
    if data is not None:
        report["skipped_unknown_labels"] = skipped
    if noise is not None:
        report["perturb"] = noise
    if report["truncated_prompts"]:
        log.warning("%d of %d prompts were longer than --max-length %d: their question text was truncated",
                    report["truncated_prompts"], len(rows), clf.encoder.max_length)
    path = write_eval_folder(model_path, out_dir, clf, rows, report, predictions, calibrate,
                             target_accuracy if fit_threshold else None, adapter_scale)
    if run is not None and (card := run.write_model_card(refresh=True)):
        log.info("refreshed the model card %s", card)
    if noise is not None:
        log.info("perturbed questions: %s:%g, seed %d, %.2f%% of the characters changed", noise["kind"],
                 noise["rate"], noise["seed"], 100 * noise["chars_changed_fraction"])
    if skipped:
        log.info("left out %d rows with labels the run does not know: %s", sum(skipped.values()), skipped)
    log.info("wrote %s", path)
    return report


def summary_table(report: dict, labels: list[str]) -> str:
    width = max(12, *(len(lab) for lab in labels))
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for lab in labels:
        m = report["per_label"][lab]
        lines.append(f"{lab:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lo, hi = report["accuracy_ci95"]
    lines += [
        "",
        f"accuracy    {report['accuracy']:.4f}  (95% CI {lo:.3f}-{hi:.3f}, n={report['n']}, chance "
        f"{report['chance']:.3f})",
        f"macro-F1    {report['macro_f1']:.4f}    weighted-F1 {report['weighted_f1']:.4f}",
        f"valid       {report['valid_pct']:.1f}%   decode {report['decode']}"
        + (f" (normalize {report['normalize']})" if report["normalize"] != "none" else "")
        + f"   {report['samples_per_s']} samples/s on {report['world_size']} process(es)",
    ]
    sel = report.get("selective")
    if sel:
        at = sel["accuracy_at_coverage"]
        lines.append(f"balanced    {report['balanced_accuracy']:.4f}    AURC {sel['aurc']:.4f}    covered "
                     f"95%: {at['0.95']:.4f}, 90%: {at['0.9']:.4f}, 80%: {at['0.8']:.4f} (most confident rows)")
    for col, table in (report.get("slices") or {}).items():
        lines.append(f"by {col} (n, correct with its 95% CI, balanced):")
        for key, m in table.items():
            lo_, hi_ = m["accuracy_ci95"]
            lines.append(f"  {key[:40]:<40} n={m['n']:<5d} {m['accuracy']:.4f} ({lo_:.3f}-{hi_:.3f})  "
                         f"{m['balanced_accuracy']:.4f}")
    cal = report.get("calibration")
    if cal:
        lines.append(f"calibration ECE {cal['ece']:.4f}  NLL {cal['nll']:.4f}  " + (
            f"at temperature {cal['temperature']:.4g} (raw: ECE {cal['ece_raw']:.4f}, NLL {cal['nll_raw']:.4f})"
            if cal["temperature"] else "(raw probabilities)"))
    return "\n".join(lines)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Score a run on its validation/test rows or on any labeled data set.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--data", default=None, help="Score this labeled data set instead of a split: a .jsonl/.json/"
                                                ".csv/.parquet file or a hub id, read as training reads --data.")
    p.add_argument("--text-column", default=None, help="With --data: the column holding the text.")
    p.add_argument("--label-column", default=None, help="With --data: the column holding the label.")
    p.add_argument("--hub-split", default=None, help="With a hub --data: the split to read.")
    p.add_argument("--skip-unknown-labels", action="store_true",
                   help="Leave out rows whose label the run does not know (counted in eval.json) instead of "
                        "stopping with an error.")
    p.add_argument("--num-val-samples", type=int, default=None, help="Score only the first N rows.")
    p.add_argument("--decode", default="auto", choices=("auto", "constrained", "exact", "free", "head"),
                   help="auto (default): constrained where answers end with an end token (chat prompts), else exact; "
                        "constrained (fast): greedy decoding over the labels' token trie, the shared instruction "
                        "computed once (always valid); exact: each label's exact probability, argmax (always "
                        "valid, slower); free: greedy text, exact match; head: a --head classification run's only decode.")
    p.add_argument("--normalize", default="auto", choices=("auto", "none", "token", "char"),
                   help="With --decode exact (auto: char for plain prompts, else none): divide each answer's log-probability by its number of tokens, or "
                        "of characters (lm-evaluation-harness acc_norm), before comparing answers.")
    p.add_argument("--perturb", default=None, metavar="typos:RATE",
                   help="Score noisy questions: each character of a question is, with probability RATE, swapped with "
                        "the next, dropped or duplicated (seeded; labels and choices untouched); eval.json records "
                        "the rate and the fraction of characters changed (default folder RUN/eval-typos-RATE).")
    p.add_argument("--perturb-seed", type=int, default=None, help="Seed of --perturb's noise (default 0).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", default=None, help="Where eval.json etc. go (default: RUN/eval).")
    p.add_argument("--base-model", default=None, help="Override the base model recorded in the run.")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--gpu-id", type=int, default=None)
    p.add_argument("--baseline", action="store_true",
                   help="Score the base model without the adapter (same prompt and rows): the untrained baseline.")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Allow the model's own code from its repository (needed when the run was trained with it).")
    p.add_argument("--calibrate", action="store_true",
                   help="Fit a temperature on the scored rows (minimum NLL of the gold labels) and write "
                        "MODEL_PATH/calibration.json; test, predict and serve then report calibrated probabilities "
                        "for the same --decode/--normalize (raw_probability beside them).")
    p.add_argument("--slice-by", action="append", default=None, metavar="COLUMN",
                   help="Also report accuracy per value of this column (repeatable; with a run's splits: its "
                        "--split-by column). Question-length bands (tokens) are always reported.")
    p.add_argument("--fit-threshold", action="store_true",
                   help="Fit the lowest confidence threshold whose covered rows reach --target-accuracy on the scored "
                        "rows and write MODEL_PATH/threshold.json; predict and serve then abstain below it.")
    p.add_argument("--target-accuracy", type=float, default=None, help="With --fit-threshold: the accuracy to reach.")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="Multiply the adapter's update by this (0: the base model, 1: the trained run; WiSE-FT-style "
                        "interpolation toward the base).")
    p.set_defaults(func=lambda a: run_validate(
        a.model_path, a.split, a.num_val_samples, a.decode, a.batch_size, a.output_dir, a.base_model, a.precision,
        a.gpu_id, a.baseline, a.data, a.text_column, a.label_column, a.hub_split, a.skip_unknown_labels,
        a.normalize, a.trust_remote_code, a.perturb, a.perturb_seed, calibrate=a.calibrate, slice_by=a.slice_by,
        fit_threshold=a.fit_threshold, target_accuracy=a.target_accuracy, adapter_scale=a.adapter_scale))
