"""The benchmark script runs end to end on the tiny model (it checks that the script works, not speed);
the fast constrained decode is exact against uncached full-sequence forwards and always valid."""

from __future__ import annotations

import json
import subprocess
import sys

from qwen_ft.encoding import PromptEncoder
from qwen_ft.inference.engine import Classifier
from qwen_ft.tasks import CategoryTask, MultipleChoiceTask
from tests.conftest import REPO, full_logprobs

QUESTIONS = ["Why is the sky blue?", "What is a contract?", "x", "Define entropy " * 5,
             "Which sorting algorithm is stable?", "What does the liver do?", "Solve 2x + 3 = 7."]


def test_benchmark_script_end_to_end(tiny_qwen3, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "vs_reference.py"), "--model", str(tiny_qwen3),
           "--data", "demo", "--max-samples-per-category", "3", "--budget-s", "1", "--num-val-samples", "4",
           "--max-length", "96", "--peak-seconds", "0.05", "--json", str(out_json), "--markdown", str(out_md),
           "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out_json.read_text())
    for key in ("train_tokens_per_s", "eval_samples_per_s", "peak_rss"):
        assert s["ratios"][key] is not None and s["ratios"][key] > 0, key
    assert 0 < s["ours"]["mfu"]
    for side in ("reference", "ours"):
        r = s[side]
        assert r["useful_tokens"] > 0 and r["padded_tokens"] >= r["useful_tokens"]
        assert r["val_n"] == 4 and 0 <= r["val_accuracy"] <= 1
        assert r["matmul_peak"]["gflops"] > 0 and r["peak_rss_mb"] > 0
    # the reference pads every example to --max-length; ours pads per batch only
    assert s["reference"]["padded_tokens"] % 96 == 0
    assert s["ours"]["val_valid_pct"] == 100.0
    table = out_md.read_text()
    assert "| metric | reference recipe | qwen-ft defaults | ours / reference |" in table
    assert "MFU" in table and "Validation samples/s" in table
    # --reference-from reuses that reference only for the same setting: another budget is refused, exit 2
    other = [*cmd[:cmd.index("--budget-s") + 1], "2", *cmd[cmd.index("--budget-s") + 2:],
             "--reference-from", str(tmp_path / "work")]
    proc = subprocess.run(other, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "measured another setting (budget_s)" in proc.stderr, proc.stderr[-2000:]


def run_benchmark(script: str, model, out, *extra: str) -> tuple[dict, str]:
    """(the JSON the script wrote, its stdout) of one benchmarks/ script on the tiny model and the demo data."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--model", str(model), "--data", "demo",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def check_profile(r: dict, printed: str) -> None:
    """where_time_goes.py's figures: printed as written, shares that add up, positive times and rates."""
    assert json.dumps(r, indent=1) in printed  # the figures printed are the figures written
    assert r["precision"] in ("fp32", "bf16") and r["threads"] >= 1
    assert r["seconds_under_profiler"] > 0 and r["tokens_per_s_under_profiler"] > 0
    shares = r["time_share"]
    assert any(g.startswith("matmul") for g in shares) and all(0 <= s <= 1 for s in shares.values())
    assert abs(sum(shares.values()) - 1) <= 0.01  # each share rounded to 3 decimals
    assert r["top_ops_self_s"] and all(t >= 0 for t in r["top_ops_self_s"].values())
    assert r["matmul_peak"]["gflops"] > 0 and (r["matmul_kernel_gflops"] or 0) >= 0
    u = r["unprofiled"]  # timed without the profiler, then each recorded operator replayed alone
    assert u["pass_s"] >= 0 and isinstance(u["pass_minor_faults"], int) and "matmuls" in u["ops_alone_s"]
    assert all(t >= 0 for t in u["ops_alone_s"].values()) and u["matmuls_share_of_pass"] >= 0
    assert u["counted_of_peak"] >= 0


def test_profile_and_levers_scripts_run(tiny_qwen3, tmp_path):
    import math

    import torch

    common = ("--max-samples-per-category", "3")
    train, printed = run_benchmark("where_time_goes.py", tiny_qwen3, tmp_path / "t.json", "--steps", "1", *common)
    check_profile(train, printed)
    assert train["train_steps"] == 1 and len(train["steps_s"]) == 1 and train["steps_s"][0] >= 0
    assert any("optimizer" in g for g in train["time_share"])  # a training step runs the optimizer
    ev, printed = run_benchmark("where_time_goes.py", tiny_qwen3, tmp_path / "e.json", "--eval", "--eval-rows", "4",
                                *common)
    check_profile(ev, printed)
    assert ev["eval_rows"] == 4 and "train_steps" not in ev
    assert not any("optimizer" in g for g in ev["time_share"])  # validation runs no optimizer
    # "fp32, dropout 0" names two training variants (dropout 0.05 and 0): both measured, one warm-up step each
    lev, printed = run_benchmark("levers.py", tiny_qwen3, tmp_path / "l.json", "--train-steps", "1", "--eval-rows",
                                 "4", "--eval-rounds", "1", "--only", "fp32, dropout 0", *common)
    assert lev["torch"] == torch.__version__ and lev["threads"] >= 1
    t = lev["train_tokens_per_s"]
    names = ["fp32, dropout 0.05", "fp32, dropout 0"]
    assert json.dumps(t, indent=1) in printed and json.dumps(lev["eval_samples_per_s"], indent=1) in printed
    assert set(t) == {*names, "first step s (includes compiling)", "losses"}
    assert all(t[n] > 0 for n in names) and set(t["first step s (includes compiling)"]) == set(names)
    for n in names:  # warm-up + one timed step, each a plausible cross-entropy over the tiny vocabulary
        assert len(t["losses"][n]) == 2 and all(math.isfinite(x) and 0 < x < 20 for x in t["losses"][n])
    e = lev["eval_samples_per_s"]
    speeds = {k: v for k, v in e.items() if not k.startswith("agreement")}
    assert len(speeds) == 8 and all(v > 0 for v in speeds.values())
    agreements = [v for k, v in e.items() if k.startswith("agreement")]
    assert len(agreements) == 2 and all(0 <= a <= 1 for a in agreements)


# ----------------------------------------------------------------------------- fast constrained decode

def brute_force_greedy(model, prompt: list[int], label_ids: dict[str, list[int]], allowed: list[str]) -> str:
    """Greedy decoding over the label trie with plain, uncached full-sequence forwards."""
    cands, done = list(allowed), []
    while len(cands) > 1:
        k = len(done)
        logp = full_logprobs(model, prompt + done)[-1]
        options = sorted({label_ids[lab][k] for lab in cands})
        tok = max(options, key=lambda t: float(logp[t]))
        cands = [lab for lab in cands if label_ids[lab][k] == tok]
        done.append(tok)
    return cands[0]


def test_fast_decode_unique_first_tokens_matches_exact_first_token_argmax(tiny_model, qwen_tok):
    """Unique first tokens: one pass decides; it equals the argmax of the exact first-token log-probs."""
    task = CategoryTask.create(["biology", "computer science", "law", "math"])
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    firsts = [enc.label_ids[lab][0] for lab in task.labels]
    assert len(set(firsts)) == len(firsts)
    rows = [{"question": q} for q in QUESTIONS]
    fast, stats = Classifier(tiny_model, enc).classify(rows, batch_size=3)
    for row, res in zip(rows, fast):
        assert res["pred"] in task.labels and res["valid"]
        logp = full_logprobs(tiny_model, enc.prompt_ids(row))[-1]
        assert res["pred"] == task.labels[int(logp[firsts].argmax())]
    # the shared instruction was computed once: far fewer tokens run than the prompts hold
    assert stats["computed_tokens"] < stats["prompt_tokens"]


def test_fast_decode_agrees_with_exact_when_continuations_are_certain(tiny_model, qwen_tok):
    """With unique first tokens, decode == exact scoring's argmax whenever P(rest of label | first) ~ 1.

    The exact score is log P(first) + log P(rest | first); forcing the continuation terms to 0 (what a
    trained model gives: it always finishes the label it started and ends the turn) must leave the
    exact argmax equal to the fast decode's.
    """
    task = CategoryTask.create(["biology", "computer science", "law", "math"])
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    rows = [{"question": q} for q in QUESTIONS]
    fast = [r["pred"] for r in Classifier(tiny_model, enc).classify(rows, batch_size=4)[0]]
    firsts = [enc.label_ids[lab][0] for lab in task.labels]
    first_only = [full_logprobs(tiny_model, enc.prompt_ids(r))[-1][firsts] for r in rows]
    exact = [task.labels[int(lp.argmax())] for lp in first_only]
    assert fast == exact


def test_fast_decode_shared_first_token_follows_greedy_trie(tiny_model, qwen_tok):
    # all labels share their first token, so every row takes the extra trie steps
    task = CategoryTask.create(["computer science", "computer vision", "computer networks"])
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    assert len({enc.label_ids[lab][0] for lab in task.labels}) == 1
    rows = [{"question": q} for q in QUESTIONS]
    fast, _ = Classifier(tiny_model, enc).classify(rows, batch_size=4)
    for row, res in zip(rows, fast):
        assert res["pred"] == brute_force_greedy(tiny_model, enc.prompt_ids(row), enc.label_ids, task.labels)


def test_fast_decode_multiple_choice_respects_each_rows_letters(tiny_model, qwen_tok):
    from tests.conftest import ForcedAnswer

    rows = [{"question": "Where do you keep milk cold?", "choices": ["oven", "fridge", "drawer", "car", "roof"]},
            {"question": "Pick one.", "choices": ["yes", "no"]},
            {"question": "Which is a prime?", "choices": ["4", "6", "7"]}]
    task = MultipleChoiceTask.create([{**r, "label": "A"} for r in rows])
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    after = enc.prompt_ids(rows[0])[-1]  # every prompt ends with the assistant turn opened
    assert all(enc.prompt_ids(r)[-1] == after for r in rows)
    # the model made to answer E: the row with five choices says E; the others have no E, and each gives the
    # greedy pick among its own letters (a decode over every letter would say E for them too)
    with ForcedAnswer(tiny_model, after, enc.label_ids["E"]):
        fast, _ = Classifier(tiny_model, enc).classify(rows, batch_size=2)
        expected = [brute_force_greedy(tiny_model, enc.prompt_ids(r), enc.label_ids, task.row_labels(r))
                    for r in rows]
    assert expected[0] == "E" and [res["pred"] for res in fast] == expected
    for row, res in zip(rows, fast):
        assert res["valid"] and res["pred"] in task.row_labels(row)
