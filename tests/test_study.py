"""The optimizer study on a tiny random Qwen3: merge verification, phase markers, resume, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from qwen_ft.errors import UserError
from qwen_ft.study import markers
from qwen_ft.study.config import load_study_config
from qwen_ft.study.phases import run_study

STUDY_YAML = """
model: {{model: {model}, precision: fp32, max_length: 192}}
data: {{data: demo-mc, max_samples: 30, val_fraction: 0.3, test_fraction: 0.0, answer_format: text}}
lora: {{rank: 4, alpha: 8}}
train: {{epochs: 2, batch_size: 8}}
merge: {{verify_samples: 2}}
eval: {{batch_size: 16}}
optimizers:
  adamw: {{learning_rate: 1.0e-2}}
  sgd: {{learning_rate: 0.1, kwargs: {{nesterov: true}}}}
"""


def _config(tiny_qwen3, out: Path, extra: str = "") -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(STUDY_YAML.format(model=tiny_qwen3) + f"output_dir: {out}\n" + extra)
    return path


def _statuses(study) -> dict[str, str]:
    return {o["phase"] + (f"[{o['optimizer']}]" if o["optimizer"] else ""): o["status"] for o in study.outcomes}


@pytest.fixture(scope="module")
def study_dir(tiny_qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "s"
    run_study(load_study_config([_config(tiny_qwen3, out)]))
    return out


# ----------------------------------------------------------------------------- merge

def test_merged_logits_equal_base_plus_adapter(tiny_run, tmp_path):
    from peft import PeftModel

    from qwen_ft.models import load_model, load_tokenizer
    from qwen_ft.study.merge import merge_run

    report = merge_run(tiny_run, tmp_path / "merged", dtype="fp32")
    assert report["merged_vs_adapter_max_abs_diff"] < 1e-5
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "label_mapping.json", "merge.json"):
        assert (tmp_path / "merged" / name).is_file(), name
    assert not list((tmp_path / "merged").glob("adapter_*"))
    # independently of merge_run: reload both and compare on fresh text
    tok = load_tokenizer(str(tiny_run))
    ids = tok(["The merged model must match.", "Another input, longer than the first one."],
              return_tensors="pt", padding=True)
    base = load_model(yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["model"])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(base, str(tiny_run)).eval()(**ids).logits
        merged = load_model(str(tmp_path / "merged")).eval()(**ids).logits
        plain = load_model(yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["model"])(**ids).logits
    mask = ids["attention_mask"].bool()
    assert (merged - ref).abs()[mask].max() < 1e-5
    assert (plain - ref).abs()[mask].max() > 1e-4  # the adapter does change the logits: the check has teeth


def test_merge_refuses_a_wrong_merge(tiny_run, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from qwen_ft.study.merge import MergeMismatch, merge_run

    monkeypatch.setattr(BaseTuner, "merge_and_unload", lambda self, *a, **k: self.unload())  # drops the adapter
    with pytest.raises(MergeMismatch, match="differ"):
        merge_run(tiny_run, tmp_path / "bad", dtype="fp32", tolerance=1e-6)
    assert not (tmp_path / "bad").exists()


def test_merge_command_line(tiny_run, tmp_path):
    from qwen_ft.cli import main

    assert main(["merge", "--model-path", str(tiny_run), "--output-dir", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["merged_vs_adapter_max_abs_diff"] < 1e-5
    assert main(["merge", "--model-path", str(tiny_run), "--output-dir", str(tmp_path / "m")]) == 2  # not empty


# ----------------------------------------------------------------------------- end to end and markers

def test_study_end_to_end_outputs(study_dir):
    res = study_dir / "results"
    rows = list(csv.DictReader(open(res / "results.csv")))
    assert [r["optimizer"] for r in rows] == ["adamw", "sgd"]
    for r in rows:
        acc, lo, hi = float(r["accuracy"]), float(r["ci_low"]), float(r["ci_high"])
        assert 0 <= lo <= acc <= hi <= 1 and int(r["n_eval"]) == 9
        for key in ("final_train_loss", "best_val_loss", "epochs_run", "train_time_s", "train_samples_per_s",
                    "train_peak_mem_mb", "eval_samples_per_s", "eval_peak_mem_mb"):
            assert float(r[key]) > 0, key
    for name in ("loss_curves.png", "accuracy.png", "resources.png"):
        assert (res / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in (res / "report.md").read_text()
    nb = json.loads((study_dir / "notebooks" / "analysis.ipynb").read_text())
    assert any("plot_loss_curves" in "".join(c["source"]) for c in nb["cells"])
    # every optimizer trained on the same cached split, with the same seed and budget
    configs = [yaml.safe_load((study_dir / "experiments" / o / "config.yaml").read_text()) for o in ("adamw", "sgd")]
    for c in configs:
        c["train"].pop("output_dir")
    assert configs[0]["data"] == configs[1]["data"] and configs[0]["train"] == configs[1]["train"]
    assert configs[0]["data"]["answer_format"] == "text"  # the study's data settings reach every run
    assert "writes the text of a choice" in (res / "report.md").read_text()
    assert configs[1]["optim"]["kwargs"] == {"nesterov": True}
    assert (study_dir / "experiments" / "sgd" / "split" / "train.jsonl").read_text() == \
        (study_dir / "experiments" / "adamw" / "split" / "train.jsonl").read_text()


def test_notebook_executes(study_dir):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import nbformat

    nb = nbformat.read(study_dir / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(study_dir / "notebooks")}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3


def test_rerun_skips_force_redoes_and_changes_propagate(study_dir, tiny_qwen3):
    cfg_path = _config(tiny_qwen3, study_dir)
    again = run_study(load_study_config([cfg_path]))
    assert set(_statuses(again).values()) == {"skipped"}
    forced = run_study(load_study_config([cfg_path]), phases=["eval"], only=["sgd"], force=True)
    assert _statuses(forced) == {"eval[sgd]": "done"}
    # the same seed reproduces the same losses and accuracy when training is redone
    run, ev = study_dir / "experiments" / "adamw", study_dir / "results" / "eval" / "adamw" / "eval.json"
    before = [(r["type"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(run / "metrics.jsonl"))
              if r["type"] != "final"]
    acc = json.loads(ev.read_text())["accuracy"]
    redo = run_study(load_study_config([cfg_path]), phases=["train", "merge", "eval"], only=["adamw"], force=True)
    assert set(_statuses(redo).values()) == {"done"}
    assert before == [(r["type"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(run / "metrics.jsonl"))
                      if r["type"] != "final"]
    assert json.loads(ev.read_text())["accuracy"] == acc
    # a different eval batch size changes the eval hash: eval + analysis rerun, training does not
    cfg_path.write_text(cfg_path.read_text().replace("eval: {batch_size: 16}", "eval: {batch_size: 4}"))
    changed = run_study(load_study_config([cfg_path]))
    s = _statuses(changed)
    assert s["train[adamw]"] == s["merge[sgd]"] == "skipped"
    assert s["eval[adamw]"] == s["eval[sgd]"] == s["analysis"] == "done"


def test_phase_needs_its_upstream(tiny_qwen3, tmp_path):
    cfg = load_study_config([_config(tiny_qwen3, tmp_path / "s2")])
    with pytest.raises(UserError, match="the data phase has not finished"):
        run_study(cfg, phases=["train"])


def test_interrupted_training_resumes(tiny_qwen3, tmp_path, monkeypatch):
    """Stop adamw after its first epoch (as SIGTERM would); the re-run resumes it and finishes the study."""
    from qwen_ft import training

    cfg = load_study_config([_config(tiny_qwen3, tmp_path / "s3", "seed: 7\n")])
    original = getattr(training.CheckpointTriggers, "on_epoch_end", None)

    def stop_after_first_epoch(self, args, state, control, **kw):
        if state.epoch and state.epoch >= 1 and not getattr(stop_after_first_epoch, "done", False):
            stop_after_first_epoch.done = True
            self.signal = 15
        return original(self, args, state, control, **kw) if original else None

    monkeypatch.setattr(training.CheckpointTriggers, "on_epoch_end", stop_after_first_epoch, raising=False)
    with pytest.raises(UserError, match="training interrupted"):
        run_study(cfg, phases=["data", "train"], only=["adamw"])
    run_dir = tmp_path / "s3" / "experiments" / "adamw"
    assert list((run_dir / "checkpoints").glob("checkpoint-*")) and markers.read(run_dir) is None
    study = run_study(cfg, phases=["data", "train"], only=["adamw"])
    assert _statuses(study) == {"data": "skipped", "train[adamw]": "done"}
    assert markers.read(run_dir)["resumed"] is True
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["type"] == "epoch"] == [1, 2]


def test_study_config_errors(tiny_qwen3, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {adamw: {}}\n")
    with pytest.raises(UserError, match="unknown key 'optimizer'"):
        load_study_config([bad])
    bad.write_text("optimizers: {adamw: {}, sgd: {kwargs: {momentun: 0.9}}}\n")
    with pytest.raises(UserError, match="optimizers.sgd.*momentun"):
        load_study_config([bad])
    with pytest.raises(UserError, match="not in the config"):
        run_study(load_study_config([_config(tiny_qwen3, tmp_path / "s4")]), only=["adabound"])
