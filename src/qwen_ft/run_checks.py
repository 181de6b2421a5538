"""The checks `RunDir` applies to what it reads from a run folder: the shape of a label mapping and its
labels against the split files, the safetensors header, and the adapter's files against each other. A folder
may come from anyone (a download, a copy, an edit): every problem is one UserError, before any loader runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qwen_ft.errors import UserError

# The temperatures fitted and accepted. Scores are logits or log-probabilities a few units apart: below 0.05
# a 0.3 gap becomes a factor of 400 (every probability rounds to 0 or 1), above 20 a 10-unit gap becomes 1.6
# (near uniform). Fitted temperatures measured on our runs lie in 1.0-1.5; a calibration.json outside this
# range is damaged or hostile, never a fit (5e-324 would make every probability NaN).
T_BOUNDS = (0.05, 20.0)
THRESHOLD_HINT = "threshold.json is written by `qwen-ft validate --fit-threshold`: run it again, or remove the file."



def read_json(path: Path, hint: str):
    """A JSON file of the run folder; missing or not JSON is a UserError carrying `hint`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing", hint) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON: {e}", hint) from None


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file's size (a truncated or damaged file is a
    UserError here, before any loader sees it)."""
    path = Path(path)
    hint = "The file is damaged or was cut short (an interrupted copy or download?): copy it again, or retrain."
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise UserError(f"{path} is not a complete safetensors file ({size} bytes)", hint)
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a valid safetensors file (its header is not JSON)", hint) from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file", hint)
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}", hint)
    return header


ADAPTER_HINT = ("adapter_config.json and adapter_model.safetensors are written together by `qwen-ft train`; "
                "restore both from the same run, or retrain.")


def check_adapter_files(folder: Path) -> None:
    """adapter_config.json readable, and its rank the one the weights were saved with."""
    hint = ADAPTER_HINT
    config = read_json(Path(folder) / "adapter_config.json", hint)
    header = safetensors_header(Path(folder) / "adapter_model.safetensors")
    r = config.get("r") if isinstance(config, dict) else None
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{folder}/adapter_config.json has no valid LoRA rank 'r' (got {r!r})", hint)
    if config.get("rank_pattern"):  # per-module ranks: the loader checks each
        return
    for name, t in header.items():
        shape = t.get("shape") if isinstance(t, dict) else None
        if not shape or len(shape) != 2:
            continue
        saved = shape[0] if ".lora_A." in name else shape[1] if ".lora_B." in name else None
        if saved is not None and saved != r:
            raise UserError(f"{folder}: adapter_config.json says LoRA rank {r}, but the saved weights have rank "
                            f"{saved} ({name})", hint)


def labels_digest(labels: list[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(list(labels), ensure_ascii=False).encode("utf-8")).hexdigest()


def mapping_problems(data) -> list[str]:
    """What is wrong with the shape of a label mapping (empty when it is usable)."""
    from qwen_ft.tasks import TASKS

    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"]
    out = []
    if data.get("task") not in TASKS:
        out.append(f"'task' must be one of {', '.join(TASKS)} (got {data.get('task')!r})")
    labels = data.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        out.append("'labels' must be a non-empty list of label texts")
    elif len(set(labels)) != len(labels):
        out.append("'labels' lists a label twice")
    elif "label_to_id" in data and data["label_to_id"] != {lab: i for i, lab in enumerate(labels)}:
        out.append("'label_to_id' does not match 'labels'")
    for key in ("instruction", "question_template"):
        if not isinstance(data.get(key), str):
            out.append(f"'{key}' must be text")
    if not out:
        n = len(labels)
        if "label2id" in data and data["label2id"] != {lab: i for i, lab in enumerate(labels)}:
            out.append("'label2id' does not match 'labels'")
        if "id2label" in data and data["id2label"] != {str(i): lab for i, lab in enumerate(labels)}:
            out.append(f"'id2label' does not match 'labels' (it must map \"0\"..\"{n - 1}\" to them in order)")
        from qwen_ft.tasks.base import template_problem

        fields = {"instruction": ("labels",), "question_template": ("question", "choices")
                  if data["task"] == "multiple_choice" else ("question",)}
        out += [p for key, allowed in fields.items() if (p := template_problem(data[key], key, allowed))]
    return out


def check_mapping_against_splits(mapping: dict, seen: dict[str, set[str]], most_choices: int, path: Path,
                                 hint: str) -> None:
    """The mapping's labels against the labels `seen` in each split file (and, for multiple choice, the most
    choices a row has): an edited mapping would otherwise score every row as wrong."""
    labels = set(mapping["labels"])
    if not seen:
        return
    every = set().union(*seen.values())
    if mapping["task"] == "multiple_choice":
        want = {chr(ord("A") + i) for i in range(most_choices)}
        if labels != want or not every <= labels:
            raise UserError(f"{path} lists the answers {''.join(sorted(labels))}, but the run's split files "
                            f"have {most_choices} choices ({''.join(sorted(want))})", hint)
        return
    missing = sorted(every - labels)  # prepare() builds the labels from the training rows: they must agree
    extra = sorted(labels - seen["train"]) if "train" in seen else []
    if missing or extra:
        parts = ([f"labels of the split rows missing from it: {', '.join(missing)}"] if missing else []) + \
                ([f"labels no training row has: {', '.join(extra)}"] if extra else [])
        raise UserError(f"{path} disagrees with the run's split files ({'; '.join(parts)})", hint)


def check_calibration(data, path: Path) -> dict:
    """A calibration.json as read: a dict with a positive finite temperature and the scoring it was fitted
    for; anything else is one UserError."""
    hint = "calibration.json is written by `qwen-ft validate --calibrate`: run it again, or remove the file."
    problems = []
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object", hint)
    t = data.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
            or not T_BOUNDS[0] <= t <= T_BOUNDS[1]:
        problems.append(f"{path}: temperature must be a number in [{T_BOUNDS[0]:g}, {T_BOUNDS[1]:g}] (got {t!r})")
    if data.get("decode") not in ("constrained", "exact", "head"):
        problems.append(f"{path}: decode must be constrained, exact or head (got {data.get('decode')!r})")
    if data.get("normalize") not in ("none", "token", "char"):
        problems.append(f"{path}: normalize must be none, token or char (got {data.get('normalize')!r})")
    if problems:
        raise UserError(problems, hint)
    return data


def check_threshold(data, path) -> dict:
    """A threshold.json as read (untrusted): a threshold in [0, 1] and the scoring it was fitted for."""
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object", THRESHOLD_HINT)
    problems = []
    t = data.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1:
        problems.append(f"{path}: threshold must be a probability in [0, 1] (got {t!r})")
    if data.get("decode") not in ("constrained", "exact", "head"):
        problems.append(f"{path}: decode must be constrained, exact or head (got {data.get('decode')!r})")
    if data.get("normalize") not in ("none", "token", "char"):
        problems.append(f"{path}: normalize must be none, token or char (got {data.get('normalize')!r})")
    temp = data.get("temperature")
    if temp is not None and (isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp)
                             or not T_BOUNDS[0] <= temp <= T_BOUNDS[1]):
        problems.append(f"{path}: temperature must be null or a number in [{T_BOUNDS[0]:g}, {T_BOUNDS[1]:g}] "
                        f"(got {temp!r})")
    scale = data.get("adapter_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 1:
        problems.append(f"{path}: adapter_scale must be a number in [0, 1] (got {scale!r})")
    if problems:
        raise UserError(problems, THRESHOLD_HINT)
    return data
