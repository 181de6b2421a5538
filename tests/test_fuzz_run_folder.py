"""A CLI fuzz over the files of a run folder received from someone else (issue 26): seeded random edits of
calibration.json, threshold.json, label_mapping.json, adapter_config.json and config.yaml. Every outcome is
exit 0 with the reference output unchanged, or exit 2 with one clear message: never a traceback, a NaN, or
a changed answer."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import yaml

from qwen_ft.cli import main

BAD_VALUES = [None, -1, 0, 5e-324, 1e-300, 1e308, math.nan, math.inf, "x", "", [], {}, True, 10**5000 // 10**4990,
              "{labels:>99999999999}", "{0}", "{foo}", "{", "}", ["law", "law"], {"0": "zzz"}]
FILES = ("calibration.json", "threshold.json", "label_mapping.json", "adapter_config.json", "config.yaml")


def _load(path):
    text = path.read_text()
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def _dump(path, data) -> None:
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))


def _keys(data, prefix=()):
    """Every key path of a nested dict."""
    for k, v in data.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _keys(v, (*prefix, k))


def mutate(path, rng: random.Random) -> str:
    """One edit of the file, described."""
    kind = rng.choice(["value", "value", "value", "delete", "truncate", "bytes", "type"])
    if kind == "truncate":
        text = path.read_bytes()
        path.write_bytes(text[: rng.randrange(len(text))])
        return "truncated"
    if kind == "bytes":
        path.write_bytes(bytes(rng.randrange(256) for _ in range(64)))
        return "random bytes"
    data = _load(path)
    if kind == "type":
        _dump(path, rng.choice([[], "text", 3, None]))
        return "not a mapping"
    key = rng.choice(list(_keys(data)))
    parent = data
    for k in key[:-1]:
        parent = parent[k]
    if kind == "delete":
        del parent[key[-1]]
        return f"deleted {'.'.join(map(str, key))}"
    value = rng.choice(BAD_VALUES)
    if parent[key[-1]] == value or (isinstance(value, float) and math.isnan(value) and path.suffix == ".yaml"):
        value = "x"
    parent[key[-1]] = value
    try:
        _dump(path, data)
    except (TypeError, ValueError):
        parent[key[-1]] = "x"
        _dump(path, data)
    return f"{'.'.join(map(str, key))} = {str(value)[:30]}"


@pytest.fixture(scope="module")
def prepared(tiny_run, tmp_path_factory):
    """The tiny run with a calibration and a threshold, and its reference answers."""
    base = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(tiny_run, base)
    (base / "calibration.json").write_text(json.dumps({"written_by": "qwen-ft", "temperature": 1.3,
                                                       "decode": "exact", "normalize": "none"}))
    (base / "threshold.json").write_text(json.dumps({"written_by": "qwen-ft", "threshold": 0.05,
                                                     "decode": "exact", "normalize": "none", "temperature": 1.3}))
    return base


def answers(run, capsys) -> tuple[int, str, str]:
    code = main(["test", "--model-path", str(run), "--top", "3", "What is a tort?", "How do ribosomes work?"])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("seed", range(25))
def test_every_edit_of_a_run_folder_is_an_unchanged_answer_or_one_clear_error(prepared, tmp_path, capsys, seed):
    code, reference, _ = answers(prepared, capsys)
    assert code == 0 and "nan" not in reference.lower()
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    rng = random.Random(seed)
    name = FILES[seed % len(FILES)]
    what = mutate(run / name, rng)
    code, out, err = answers(run, capsys)
    assert "Traceback" not in err and "internal error" not in err, (name, what, err)
    assert "nan" not in out.lower(), (name, what, out)
    assert code in (0, 2), (name, what, code, err)
    if code == 0:
        assert out == reference, (name, what)
    else:
        assert "error" in err.lower() and len(err.strip().splitlines()) <= 8, (name, what, err)
