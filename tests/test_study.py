"""The optimizer study on a tiny random Qwen3: merge verification, phase markers, resume, end to end."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from qwen_ft.errors import UserError
from qwen_ft.study.config import load_study_config
from qwen_ft.study.phases import run_study

STUDY_YAML = """
model: {{model: {model}, precision: fp32, max_length: 192}}
data: {{data: demo-mc, max_samples: 40, val_fraction: 0.3, test_fraction: 0.0, answer_format: text}}
lora: {{rank: 4, alpha: 8}}
train: {{batch_size: 8, early_stopping_patience: 0}}
merge: {{verify_samples: 2}}
eval: {{batch_size: 16}}
protocol: {{trials: 2, final_seeds: [1, 2], tune_rows: 8, trial_max_steps: 3, final_max_steps: 4, eval_steps: 2,
           curve_rows: 8, target: 0.3}}
optimizers:
  adamw: {{search: {{learning_rate: {{low: 1.0e-3, high: 1.0e-2}}}}}}
  sgd: {{search: {{learning_rate: [0.01, 0.5]}}, fixed: {{nesterov: true}}}}
"""


def _config(tiny_qwen3, out: Path, extra: str = "") -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(STUDY_YAML.format(model=tiny_qwen3) + f"output_dir: {out}\n" + extra)
    return path


def _statuses(study) -> dict[str, str]:
    return {o["name"]: o["status"] for o in study.outcomes}


@pytest.fixture(scope="module")
def study_dir(tiny_qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "s"
    run_study(load_study_config([_config(tiny_qwen3, out)]))
    return out


# ----------------------------------------------------------------------------- merge

def test_merged_logits_equal_base_plus_adapter(tiny_run, tmp_path):
    from peft import PeftModel

    from qwen_ft.merge import merge_run
    from qwen_ft.models import load_model, load_tokenizer

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

    from qwen_ft.merge import MergeMismatch, merge_run

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

def _trials(out: Path, opt: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "trials" / opt).glob("trial-*/trial.json"))]


def _finals(out: Path) -> dict:
    return {str(p.parent.relative_to(out)): json.loads(p.read_text())
            for p in sorted((out / "finals").glob("*/seed-*/result.json"))}


def test_study_end_to_end_outputs(study_dir):
    summary = json.loads((study_dir / "data" / "summary.json").read_text())
    assert summary["sizes"]["tune"] == 8 and summary["sizes"]["validation"] == 12
    tune = {r["id"] for r in map(json.loads, (study_dir / "data" / "tune.jsonl").read_text().splitlines())}
    val = {r["id"] for r in map(json.loads, (study_dir / "data" / "validation.jsonl").read_text().splitlines())}
    train = {r["id"] for r in map(json.loads, (study_dir / "data" / "train.jsonl").read_text().splitlines())}
    assert tune and not tune & val and not tune & train  # the tuning split is carved from training, never validation
    for opt in ("adamw", "sgd"):
        trials = _trials(study_dir, opt)
        assert [t["k"] for t in trials] == [0, 1] and {t["steps"] for t in trials} == {3}  # same count, same budget
        assert all(t["n"] == 8 for t in trials)  # scored on the tuning split
        for t in trials:  # the run's time is split into parts that add up, none counted twice
            parts = t["train_seconds"] - t["in_loop_eval_s"], t["in_loop_eval_s"], t["overhead_s"]
            # (the overhead also holds scoring's set-up, outside the scoring clock: >=, not ==)
            assert min(parts) >= -0.02 and sum(parts) >= t["trained_s"] - 0.05
        lo, hi = (1e-3, 1e-2) if opt == "adamw" else (0.01, 0.5)
        assert all(lo <= t["params"]["learning_rate"] <= hi for t in trials)
        assert len({t["params"]["learning_rate"] for t in trials}) == 2  # quasirandom points differ
        for seed in (1, 2):
            final = json.loads((study_dir / "finals" / opt / f"seed-{seed}" / "result.json").read_text())
            assert final["steps"] == 4 and final["n"] == 12 and final["best_step"] in (2, 4)
            # the best tuning accuracy; ties go to the lower tuning loss, then the earlier trial
            best = max(trials, key=lambda t: (t["score"], -t["tune_loss"], -t["k"]))
            assert final["params"] == best["params"]
            assert final["optimizer_state_bytes"] > 0
            curve = [json.loads(x) for x in (study_dir / "finals" / opt / f"seed-{seed}" / "metrics.jsonl")
                     .read_text().splitlines() if '"curve"' in x]
            assert [c["step"] for c in curve] == [2, 4] and all(c["n"] == 8 for c in curve)
    adam = json.loads((study_dir / "finals" / "adamw" / "seed-1" / "result.json").read_text())
    sgd = json.loads((study_dir / "finals" / "sgd" / "seed-1" / "result.json").read_text())
    # counted from the state tensors: AdamW keeps m and v, SGD one momentum buffer, per LoRA parameter; AdamW
    # also a 4-byte step per tensor (2 layers x 7 adapted modules x A, B = 28 tensors)
    assert adam["optimizer_state_bytes"] == 2 * sgd["optimizer_state_bytes"] + 4 * 28
    ids = [json.loads(x)["id"] for x in (study_dir / "finals" / "adamw" / "seed-1" / "eval" / "predictions.jsonl")
           .read_text().splitlines()]
    assert set(ids) == val  # finals are scored on the validation split
    for name in ("untrained", "untrained_loglik_token", "untrained_loglik_char"):
        assert json.loads((study_dir / "baselines" / name / "eval.json").read_text())["n"] == 12
    res = study_dir / "results"
    for name in ("report.md", "results.csv", "summary.csv", "pairwise.csv", "trials.csv", "lr_sensitivity.png",
                 "accuracy_per_seed.png", "curves.png", "time_to_target.png", "resources.png"):
        assert (res / name).is_file(), name
    with open(res / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "adamw vs sgd" in (res / "report.md").read_text()
    assert (study_dir / "models" / "adamw" / "merge.json").is_file()
    assert (study_dir / "optuna.db").is_file()


def test_optuna_storage_holds_each_trial_once(study_dir):
    import optuna

    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert sorted(n.split("-")[0] for n in names) == ["adamw", "sgd"]
    for name in names:
        trials = optuna.load_study(study_name=name, storage=storage).trials
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert sorted(t.user_attrs["k"] for t in complete) == [0, 1]


def test_rerun_skips_and_reproduces(study_dir, tiny_qwen3, tmp_path):
    before = _finals(study_dir)
    study = run_study(load_study_config([_config(tiny_qwen3, study_dir)]))
    assert set(_statuses(study).values()) == {"skipped"}
    # the same config and seed in a fresh folder reproduces every trial and final
    other = tmp_path / "again"
    run_study(load_study_config([_config(tiny_qwen3, other)]), phases=["data", "train"])
    for opt in ("adamw", "sgd"):
        assert [(t["params"], t["score"], t["tune_loss"]) for t in _trials(other, opt)] == \
               [(t["params"], t["score"], t["tune_loss"]) for t in _trials(study_dir, opt)]
    again = _finals(other)
    assert {k: (v["accuracy"], v["tune_loss"], v["best_step"]) for k, v in again.items()} == \
           {k: (v["accuracy"], v["tune_loss"], v["best_step"]) for k, v in before.items()}


def test_in_process_trial_equals_a_separate_training_process(study_dir, tiny_qwen3, tmp_path):
    """A study run (base model loaded once, copied per run) gives the adapter a fresh `qwen-ft train` gives."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    final = study_dir / "finals" / "adamw" / "seed-1"
    cfg = yaml.safe_load((final / "config.yaml").read_text())
    cfg["train"]["output_dir"] = str(tmp_path / "solo")
    (tmp_path / "solo.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "qwen_ft", "train", "--config", str(tmp_path / "solo.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = load_file(final / "adapter_model.safetensors"), load_file(tmp_path / "solo" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phase_needs_its_upstream(tiny_qwen3, tmp_path):
    with pytest.raises(UserError, match="data phase has not finished"):
        run_study(load_study_config([_config(tiny_qwen3, tmp_path / "fresh")]), phases=["train"])


KILL_TRIAL = """
import os, sys
import qwen_ft.training.batches as t
orig = t.answer_loss
def loss(*a, **k):  # the first training step after the first trial finished: inside the second trial
    if os.path.exists(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), 9)
    return orig(*a, **k)
t.answer_loss = loss
from qwen_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_study_resumes_the_trial(tiny_qwen3, tmp_path, monkeypatch):
    """kill -9 during a trial; the re-run takes the trial over (once its heartbeat is stale) and finishes with
    exactly the trials of an uninterrupted study, none run twice, none lost."""
    import subprocess
    import sys

    import optuna

    from qwen_ft.study import protocol

    out = tmp_path / "k"
    path = _config(tiny_qwen3, out)
    script = tmp_path / "kill.py"
    script.write_text(KILL_TRIAL)
    env = {**os.environ, "KILL_AFTER": str(out / "trials" / "adamw" / "trial-0" / "trial.json")}
    proc = subprocess.run([sys.executable, str(script), "study", "--config", str(path), "--phases", "data", "train",
                           "--optimizers", "adamw"], env=env, capture_output=True, text=True)
    assert proc.returncode == -9
    assert len(_trials(out, "adamw")) == 1
    monkeypatch.setattr(protocol, "HEARTBEAT_S", 1)  # this worker calls a trial stale after 3 s without heartbeat
    storage = f"sqlite:///{out / 'optuna.db'}"
    study = run_study(load_study_config([path]), phases=["train"], only=["adamw"])
    assert [t["k"] for t in _trials(out, "adamw")] == [0, 1]
    name = next(s.study_name for s in optuna.get_all_study_summaries(storage) if s.study_name.startswith("adamw"))
    complete = [t for t in optuna.load_study(study_name=name, storage=storage).trials
                if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["k"] for t in complete) == [0, 1]
    assert any(o["name"] == "final[adamw, seed 2]" and o["status"] == "done" for o in study.outcomes)


def test_two_workers_share_the_trials(tiny_qwen3, tmp_path):
    """Two worker processes on one SQLite storage: every trial runs exactly once."""
    import subprocess
    import sys

    out = tmp_path / "w"
    path = _config(tiny_qwen3, out, "protocol: {trials: 4, final_seeds: [1], tune_rows: 8, trial_max_steps: 2, "
                                    "eval_steps: 2, final_max_steps: 2}\n")
    assert subprocess.run([sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "data"],
                          capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "train", "--optimizers",
           "adamw"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [log[-3000:] for log in logs]
    ran = [line for log in logs for line in log.splitlines() if line.startswith("trial ") and "tuning accuracy" in line]
    assert len(ran) == 4, ran  # four trials trained, none twice
    assert sorted(t["k"] for t in _trials(out, "adamw")) == [0, 1, 2, 3]


def test_a_trial_claimed_by_another_worker_waits_for_it_instead_of_failing(tiny_qwen3, tmp_path):
    """A worker that pops a trial whose claim another process holds (a copy queued again after its heartbeat
    went stale) keeps it queued and runs it once the claim is free - no error exit, no trial left out."""
    import subprocess
    import sys
    import time

    from filelock import FileLock

    out = tmp_path / "w"
    path = _config(tiny_qwen3, out, "protocol: {trials: 2, final_seeds: [1], tune_rows: 8, trial_max_steps: 2, "
                                    "eval_steps: 2, final_max_steps: 2}\n")
    assert subprocess.run([sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "data"],
                          capture_output=True).returncode == 0
    (out / "trials" / "adamw").mkdir(parents=True)
    claim = FileLock(str(out / "trials" / "adamw" / ".trial-0.claim"))  # as another worker running trial 0
    claim.acquire()
    worker = subprocess.Popen([sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "train",
                               "--optimizers", "adamw"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "trials" / "adamw" / "trial-1" / "trial.json").is_file():
        time.sleep(0.5)
    assert worker.poll() is None  # trial 1 done, trial 0 still waiting for its claim: the worker did not leave
    claim.release()
    log = worker.communicate(timeout=600)[0]
    assert worker.returncode == 0, log[-3000:]
    assert "being run by another worker" in log
    assert sorted(t["k"] for t in _trials(out, "adamw")) == [0, 1]


def test_study_config_errors(tiny_qwen3, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{model: {tiny_qwen3}}}\noptimizers:\n  '../../victim': {{}}\n")
    with pytest.raises(UserError, match="plain name"):
        load_study_config([bad])
    bad.write_text(f"model: {{model: {tiny_qwen3}}}\noptimizers:\n  a: {{optimizer: this.s}}\n")
    with pytest.raises(UserError, match="this.s"):
        load_study_config([bad])
    bad.write_text(f"model: {{model: {tiny_qwen3}}}\noptimizers:\n  adamw: {{search: {{learning_rate: [1, 0.1]}}}}\n")
    with pytest.raises(UserError, match="low < high"):
        load_study_config([bad])
    bad.write_text(f"model: {{model: {tiny_qwen3}}}\nprotocl: {{trials: 2}}\n")
    with pytest.raises(UserError, match="did you mean 'protocol'"):
        load_study_config([bad])
    (tmp_path / "file").write_text("x")
    bad.write_text(f"model: {{model: {tiny_qwen3}}}\noutput_dir: {tmp_path / 'file'}\n")
    with pytest.raises(UserError, match="not a folder"):
        load_study_config([bad])


def test_data_phase_never_overwrites_foreign_files(tiny_qwen3, tmp_path):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "train.jsonl").write_text("my own data\n")
    with pytest.raises(UserError, match="did not write"):
        run_study(load_study_config([_config(tiny_qwen3, out)]), phases=["data"])
    assert (out / "data" / "train.jsonl").read_text() == "my own data\n"


def test_a_diverging_trial_is_recorded_as_failed_with_the_worst_score_and_never_requeued(tiny_qwen3, tmp_path,
                                                                                         monkeypatch):
    import qwen_ft.study.trials as trials_module
    from qwen_ft.study import protocol

    cfg = _config(tiny_qwen3, tmp_path / "s", "").read_text().replace(
        "sgd: {search: {learning_rate: [0.01, 0.5]}", "sgd: {search: {learning_rate: [1.0e+6, 1.0e+7]}")
    path = tmp_path / "diverge.yaml"
    path.write_text(cfg)
    study = run_study(load_study_config([path]))  # finishes: report, plots and all
    trials = [json.loads((tmp_path / "s" / "trials" / "sgd" / f"trial-{k}" / "trial.json").read_text())
              for k in range(2)]
    states = [t["state"] for t in trials]
    assert "diverged" in states or all(
        json.loads((tmp_path / "s" / "finals" / "sgd" / f"seed-{s}" / "result.json").read_text())["state"]
        == "diverged" for s in (1, 2))
    for t in trials:
        assert t["state"] in ("complete", "diverged") and (t["state"] == "complete" or t["score"] == 0.0)
    text = (tmp_path / "s" / "results" / "report.md").read_text()
    assert "diverged" in text.lower()
    assert study is not None and protocol.best_trial(trials) in [t for t in trials if t["state"] == "complete"] + [None]
    trained = []
    monkeypatch.setattr(trials_module, "train_and_score", lambda *a, **k: trained.append(a) or pytest.fail("re-trained"))
    run_study(load_study_config([path]), phases=["train"], only=["sgd"])
    assert not trained  # the diverged runs were read back, not queued and trained again
