"""The run folder's README.md: a Hugging Face model card (YAML metadata, then what was measured).

Written by `train` when a run completes and refreshed by `validate`, from the run's own files only: the
figures are the ones in its `eval*/eval.json`, each with the split it scored and its n, so a card never
claims more than was measured. Held-out rows (the test split of a run split by source) come first.
"""

from __future__ import annotations

from pathlib import Path

import yaml

MARKER = "<!-- model card written by qwen-ft (train, refreshed by validate) -->"
PIPELINE_TAG = {"category": "text-classification", "multiple_choice": "text-generation"}


def _metadata(info: dict, mapping: dict, data: str | None) -> dict:
    meta = {"base_model": info.get("base_model_path") or info.get("base_model"), "library_name": "peft",
            "pipeline_tag": PIPELINE_TAG.get(mapping.get("task"), "text-generation"),
            "tags": ["qwen-ft", "lora", mapping.get("task", "category")]}
    if data and "://" not in str(data):
        meta["datasets"] = [Path(str(data)).name if Path(str(data)).suffix else str(data)]
    if mapping.get("task") == "category":
        meta["labels"] = list(mapping.get("labels") or [])
    return meta


def _describe(name: str, report: dict) -> str:
    split = report.get("split")
    what = f"the {split} split" if split else f"`{report.get('data', '?')}`"
    extra = []
    if report.get("perturb"):
        p = report["perturb"]
        extra.append(f"with {p.get('kind')} at rate {p.get('rate')}")
    if report.get("adapter_scale") not in (None, 1.0):
        extra.append(f"adapter scale {report['adapter_scale']}")
    return f"`{name}/`: {what}" + (f" ({', '.join(extra)})" if extra else "")


def _row(name: str, report: dict) -> str:
    lo, hi = report.get("accuracy_ci95") or (float("nan"), float("nan"))
    balanced = report.get("balanced_accuracy")
    cal = report.get("calibration") or {}
    at90 = ((report.get("selective") or {}).get("accuracy_at_coverage") or {}).get("0.9")
    cells = [_describe(name, report), str(report.get("n", "?")), f"{100 * report['accuracy']:.1f} % "
             f"({100 * lo:.1f}-{100 * hi:.1f})", "-" if balanced is None else f"{100 * balanced:.1f} %",
             f"{report.get('macro_f1', float('nan')):.3f}", "-" if "ece" not in cal else f"{cal['ece']:.3f}",
             "-" if at90 is None else f"{100 * at90:.1f} %"]
    return "| " + " | ".join(cells) + " |"


def _held_out_first(evals: dict[str, dict]) -> list[tuple[str, dict]]:
    return sorted(evals.items(), key=lambda kv: (kv[1].get("split") != "test", kv[0]))


def render(info: dict, mapping: dict, data: str | None, split_by: str | None, evals: dict[str, dict],
           threshold: dict | None = None) -> str:
    """The card's text. `evals` maps an eval folder's name (e.g. "eval", "eval-test") to its eval.json."""
    meta = _metadata(info, mapping, data)
    labels = mapping.get("labels") or []
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", MARKER, "",
             f"# {mapping.get('task', 'category')} classifier on {meta['base_model']}", "",
             f"A LoRA adapter trained with qwen-ft to generate one of {len(labels)} labels "
             f"({', '.join(labels[:20])}{', ...' if len(labels) > 20 else ''}) for a question.", "",
             "## Measured", ""]
    if evals:
        lines += ["| scored rows | n | accuracy (95 % CI) | balanced accuracy | macro-F1 | ECE | "
                  "accuracy at 90 % coverage |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [_row(name, rep) for name, rep in _held_out_first(evals)]
        if split_by:
            lines += ["", f"The test split holds whole groups of `{split_by}` that training never saw: it is the "
                      "figure to expect on traffic from other sources."]
    else:
        lines.append("Nothing measured yet: run `qwen-ft validate --model-path THIS_FOLDER [--split test]`.")
    if threshold:
        lines += ["", f"Abstention: `threshold.json` routes answers below confidence {threshold.get('threshold')} to "
                  f"the fallback label; on `{threshold.get('fitted_on')}` that kept {threshold.get('coverage')} of the "
                  f"rows at accuracy {threshold.get('covered_accuracy')} (target {threshold.get('target_accuracy')})."]
    lines += ["", "## Intended use and limitations", "",
              "Routing or tagging questions like the training rows. Accuracy off the training distribution is "
              "lower than in distribution (see the held-out rows above, where measured); route low-confidence "
              "answers to a fallback (`--min-confidence` or `validate --fit-threshold`). The labels are the "
              "training set's; a question outside them still gets one of them.", "",
              f"Trained by qwen-ft{' ' + str((info.get('versions') or {}).get('qwen-ft')) if (info.get('versions') or {}).get('qwen-ft') else ''}; the exact command, "
              "versions and split files are in this folder (`run.json`, `config.yaml`, `split/`)."]
    return "\n".join(lines) + "\n"
