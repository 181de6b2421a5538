"""torchrun on CPU (gloo) with a tiny random Qwen3: one code path for 1..N processes.

Each test launches `python -m torch.distributed.run --standalone --nproc_per_node=2` (free port, so
parallel test sessions do not collide). What is compared, precisely:
- every rank reports its optimizer steps, its model wrapper class and a sha256 of its in-memory adapter
  (qwen_ft.distributed.tensors_digest over peft's adapter state dict) in metrics.jsonl's final line;
  the test recomputes the same digest from the saved adapter_model.safetensors and compares it with
  rank 0's, so "saved == rank 0's in-memory adapter" is checked through that digest;
- the same seed twice (torchrun, then accelerate launch with configs/accelerate/ddp.yaml) gives a
  bit-identical saved adapter; --gradient-checkpointing gives the same adapter up to rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_ft import distributed as dist
from qwen_ft.errors import UserError
from qwen_ft.runs import RunDir
from tests.conftest import tiny_train_args

pytestmark = pytest.mark.distributed

N_TRAIN = 42  # demo data, --max-samples-per-category 5: 14 labels x 3 training rows
PER_DEVICE = 8  # tiny_train_args' --batch-size


def torchrun(*args: str, cwd: Path, timeout: int = 240, script: Path | None = None) -> tuple[int, str, float]:
    """Run `torchrun --nproc_per_node=2 -m qwen_ft ARGS` (or SCRIPT ARGS); (exit code, output, seconds)."""
    target = [str(script)] if script else ["-m", "qwen_ft"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def final_record(run: Path) -> dict:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]


def saved_adapter(run: Path) -> dict:
    return load_file(run / "adapter_model.safetensors")


def ddp_train(model: Path, workdir: Path, *extra: str) -> tuple[Path, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    rc, output, _ = torchrun(*tiny_train_args(model, workdir / "run", *extra), cwd=workdir)
    assert rc == 0, output[-4000:]
    return workdir / "run", output


def check_ddp_run(run: Path, output: str, gradient_checkpointing: bool = False) -> None:
    """Both ranks stepped in one DDP job; rank 0 alone logged and wrote; the saved adapter is rank 0's."""
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # one run folder, nothing else written
    assert (run / "COMPLETE").is_file() and not (run / "checkpoints").exists()
    assert not list(run.glob("*.bin"))

    final = final_record(run)
    steps = math.ceil(N_TRAIN / (PER_DEVICE * 2))  # each rank trains its half of every global batch
    assert final["world_size"] == 2 and final["global_batch"] == PER_DEVICE * 2 and final["step"] == steps
    ranks = final["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps"] == steps for r in ranks)
    assert all(r["model_wrapper"] == "DistributedDataParallel" for r in ranks)
    assert all(r["gradient_checkpointing"] is gradient_checkpointing for r in ranks)
    assert all(r["peak_rss_mb"] > 0 for r in ranks)
    assert final["peak_rss_mb"] == max(r["peak_rss_mb"] for r in ranks)
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]  # gradients were all-reduced
    assert dist.tensors_digest(saved_adapter(run)) == ranks[0]["adapter_sha256"]

    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["per_device_batch"] == PER_DEVICE and info["global_batch"] == 16

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_lines = [x["step"] for x in lines if x["type"] == "step"]
    assert step_lines == list(range(1, steps + 1))  # the loss is logged once per step, not once per rank
    assert [x["type"] for x in lines].count("epoch") == 1 and [x["type"] for x in lines].count("final") == 1

    assert output.count("Epoch 1: train_loss=") == 1 and output.count("resolved config:") == 1
    assert "batch: 8 per device x 2 processes x 1 grad-accum = 16 global" in output
    assert "model wrapped in DistributedDataParallel" in output
    assert "mark a variable ready only once" not in output


@pytest.fixture(scope="module")
def ddp_run(tiny_qwen3, tmp_path_factory) -> tuple[Path, str]:
    return ddp_train(tiny_qwen3, tmp_path_factory.mktemp("ddp-a"))


def test_torchrun_train_is_one_ddp_job(ddp_run):
    check_ddp_run(*ddp_run)


def test_torchrun_train_gradient_checkpointing(ddp_run, tiny_qwen3, tmp_path):
    run, output = ddp_train(tiny_qwen3, tmp_path / "gc", "--gradient-checkpointing")
    check_ddp_run(run, output, gradient_checkpointing=True)
    # non-reentrant checkpointing recomputes the same activations: the same adapter up to rounding
    a, b = saved_adapter(ddp_run[0]), saved_adapter(run)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_torchrun_validate_matches_single_process(ddp_run, tmp_path):
    """Sharded validation writes the same bytes as one process, in the default precision (bf16 where the
    CPU has it): every row is scored in the same batch whatever the number of processes."""
    from qwen_ft.commands.validate import run_validate

    run = ddp_run[0]
    rc, output, _ = torchrun("validate", "--model-path", str(run), "--batch-size", "3",  # 5 batches: 3 + 2
                             "--output-dir", str(tmp_path / "ddp"), cwd=tmp_path)
    assert rc == 0, output[-4000:]
    single = run_validate(str(run), batch_size=3, output_dir=str(tmp_path / "single"))
    ddp = (tmp_path / "ddp" / "predictions.jsonl").read_text()
    assert ddp == (tmp_path / "single" / "predictions.jsonl").read_text()
    assert [json.loads(x)["id"] for x in ddp.splitlines()] == [r["id"] for r in RunDir(run).split("validation")]
    report = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert report["world_size"] == 2 and len(report["memory_per_rank"]) == 2 and single["world_size"] == 1
    assert all(m["peak_rss_mb"] > 0 for m in report["memory_per_rank"])
    assert report["accuracy"] == single["accuracy"] and report["n"] == single["n"] == 14
    assert output.count("accuracy ") == 1  # rank 0 alone prints the report


LAUNCHER = """
    import os
    import sys

    {patch}

    from qwen_ft.cli import main

    sys.exit(main(sys.argv[1:]))
"""

FAIL_ON_RANK_1 = """
    from qwen_ft.training import batches
    from qwen_ft.errors import UserError

    if os.environ["RANK"] == "1":  # rank 1 meets a bad batch at its second step; rank 0 waits in all-reduce
        real, calls = batches.answer_loss, []

        def failing_loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise UserError("injected failure on rank 1 (bad batch)")
            return real(*args, **kwargs)

        batches.answer_loss = failing_loss
"""

SIGTERM_ON_RANK_1 = """
    import signal

    from qwen_ft.training import batches

    if os.environ["RANK"] == "1":  # only rank 1 is told to stop, in the middle of its second step
        real, calls = batches.answer_loss, []

        def loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)

        batches.answer_loss = loss
"""

NO_USE_CPU = """
    import peft  # noqa: F401  (importing peft replaces the lazy `transformers` module: patch after it)
    import transformers

    real = transformers.TrainingArguments

    def without_use_cpu(*args, **kwargs):  # the classic mistake: a CPU Trainer without use_cpu=True
        return real(*args, **{**kwargs, "use_cpu": False, "ddp_backend": None})

    transformers.TrainingArguments = without_use_cpu
"""


def launcher(tmp_path: Path, patch: str) -> Path:
    script = tmp_path / "launch.py"
    script.write_text(textwrap.dedent(LAUNCHER).replace("{patch}", textwrap.dedent(patch).strip()))
    return script


def test_failing_rank_stops_the_job(tiny_qwen3, tmp_path):
    script = launcher(tmp_path, FAIL_ON_RANK_1)
    rc, output, seconds = torchrun(*tiny_train_args(tiny_qwen3, tmp_path / "run"), cwd=tmp_path, script=script)
    assert rc != 0 and seconds < 180
    assert "qwen-ft train [rank 1/2]: error: injected failure on rank 1 (bad batch)" in output, output[-6000:]
    assert not (tmp_path / "run" / "COMPLETE").exists()  # the half-done folder does not look finished
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_qwen3, tmp_path):
    script = launcher(tmp_path, SIGTERM_ON_RANK_1)
    rc, output, seconds = torchrun(*tiny_train_args(tiny_qwen3, tmp_path / "run", "--epochs", "2"), cwd=tmp_path,
                                   script=script)
    assert rc != 0 and seconds < 180
    for r in (0, 1):  # rank 0 saw no signal but stopped with rank 1, so that rank 0 could write the checkpoint
        assert f"qwen-ft train [rank {r}/2]: error: training interrupted at step 2" in output
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert not (tmp_path / "run" / "COMPLETE").exists()


def test_processes_that_would_train_separately_are_refused(tiny_qwen3, tmp_path):
    script = launcher(tmp_path, NO_USE_CPU)
    rc, output, _ = torchrun(*tiny_train_args(tiny_qwen3, tmp_path / "run"), cwd=tmp_path, script=script)
    assert rc != 0
    assert "the Trainer sees world size 1 but WORLD_SIZE=2" in output
    assert "2 separate copies, not one DDP job" in output
    assert not (tmp_path / "run" / "COMPLETE").exists()


# ----------------------------------------------------------------------------- in-process checks (fast)

def test_world_size_without_a_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(UserError, match="cannot form one training job"):
        dist.init()


def test_invalid_gpu_id_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match="no CUDA GPU is available" if n == 0 else "is invalid"):
        dist.select_gpu(n)
    with pytest.raises(UserError, match=">= 0"):
        dist.select_gpu(-1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="cannot be used under torchrun"):
        dist.select_gpu(0)


def test_gpu_id_hides_the_other_gpus(monkeypatch):
    """The GPU choice itself, with CUDA mocked (this machine has none): ids count within CUDA_VISIBLE_DEVICES."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    dist.select_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    with pytest.raises(UserError, match=r"--gpu-id 4 is invalid: 4 GPU\(s\) are visible \(ids 0..3\)"):
        dist.select_gpu(4)
    dist.select_gpu(None)  # one process on a 4-GPU machine: GPU 0 only, not DataParallel over all four
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    dist.select_gpu(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_row_once_in_the_same_batches(monkeypatch, world):
    lengths = [5, 3, 9, 1, 7, 7, 2, 8, 4, 6, 3]
    plan = dist.batch_plan(lengths, 3)
    assert plan == dist.batch_plan(lengths, 3) and sorted(sum(plan, [])) == list(range(11))
    assert [lengths[i] for i in sum(plan, [])] == sorted(lengths)
    capped = dist.batch_plan(lengths, 3, max_tokens=16)  # rows x longest row <= 16 (a longer row alone)
    assert sorted(sum(capped, [])) == list(range(11))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 16 for b in capped)
    assert max(len(b) for b in capped) <= 3 and len(capped) > len(plan)
    packed = dist.batch_plan(lengths, 3, max_tokens=12, packed=True)  # real tokens <= 12 (a longer row alone)
    assert sorted(sum(packed, [])) == list(range(11))
    assert all(len(b) == 1 or sum(lengths[i] for i in b) <= 12 for b in packed)
    assert any(len(b) * max(lengths[i] for i in b) > 12 for b in packed)  # more rows than a padded cap allows
    monkeypatch.setenv("WORLD_SIZE", str(world))
    seen = []
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        seen += [plan[b] for b in dist.shard(plan)]
    assert sorted(seen) == sorted(plan)  # whole batches, each on exactly one rank


def test_tensors_digest_sees_values_names_and_dtypes():
    a = {"x": torch.ones(2, 3), "y": torch.zeros(4)}
    assert dist.tensors_digest(a) == dist.tensors_digest({"y": torch.zeros(4), "x": torch.ones(2, 3)})
    assert dist.tensors_digest(a) != dist.tensors_digest({**a, "x": torch.ones(2, 3) + 1e-6})
    assert dist.tensors_digest(a) != dist.tensors_digest({"x2": a["x"], "y": a["y"]})
    assert dist.tensors_digest(a) != dist.tensors_digest({**a, "y": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(RuntimeError, match="did not train as one DDP job"):
        dist.check_replicas([{"adapter_sha256": "a"}, {"adapter_sha256": "b"}])
    assert dist.max_memory([{"peak_rss_mb": 1.0, "rank": 0}, {"peak_rss_mb": 3.0, "rank": 1}]) == {"peak_rss_mb": 3.0}


# ----------------------------------------------------------------------------- launcher configs

ACCELERATE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_load_and_open_with_their_command():
    from accelerate.commands.config.config_args import load_config_from_file

    assert {p.stem for p in ACCELERATE_CONFIGS} >= {"ddp", "fsdp", "ds_zero2", "ds_zero3"}
    for path in ACCELERATE_CONFIGS:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} "), path
        assert " -m qwen_ft train " in first, path
        config = load_config_from_file(str(path))
        assert config.mixed_precision == "no", path  # qwen-ft's --precision decides
        assert config.num_machines == 1 and config.num_processes >= 2, path


def test_accelerate_launch_ddp_config_same_job_same_adapter(ddp_run, tiny_qwen3, tmp_path):
    """configs/accelerate/ddp.yaml starts the same gloo DDP job on CPU: with the same seed, the same adapter."""
    ddp = next(p for p in ACCELERATE_CONFIGS if p.stem == "ddp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ddp), "--main_process_port", "0",
           "-m", "qwen_ft", *tiny_train_args(tiny_qwen3, tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    check_ddp_run(tmp_path / "run", proc.stdout + proc.stderr)
    a, b = saved_adapter(ddp_run[0]), saved_adapter(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # and trained (B starts at zero)
