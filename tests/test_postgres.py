"""Study workers on a real PostgreSQL server, started here in a temporary folder (initdb + pg_ctl).

The server is Debian's `postgresql` package (scripts/setup.sh installs it where it can); without it the test skips
with the reason, except under CI=true, where a missing server is a failure.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qwen_ft.study.config import load_study_config
from qwen_ft.study.phases import run_study

from .test_study import KILL_TRIAL, _config, _finals, _trials

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

PROTOCOL = ("protocol: {{trials: 4, final_seeds: [1], tune_rows: 8, trial_max_steps: 2, eval_steps: 2, "
            "final_max_steps: 2{storage}}}\n")


def _server_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")] if
                                                                       shutil.which("initdb") else [])
    if not found:
        msg = "PostgreSQL is not installed (Debian: apt-get install postgresql; scripts/setup.sh does it as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - CI must install it")
        pytest.skip(msg)
    return Path(found[-1]).parent


def _as_server_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root: run them as the package's unprivileged user
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'qwen-ft[postgres]')")
    bin_dir = _server_bin()
    root = Path(tempfile.mkdtemp(prefix="qwenft-pg-"))  # short: the unix socket's path has a length limit
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(_as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                    "--no-sync"]), check=True, capture_output=True)
    subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                    "-o", f"-k {root} -h 127.0.0.1 -p {port}", "start"]), check=True,
                   capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _study(tiny_qwen3, out: Path, url: str | None) -> Path:
    path = _config(tiny_qwen3, out, PROTOCOL.format(storage=f", storage: '{url}'" if url else ""))
    proc = subprocess.run([sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "data"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path


def _scores(out: Path) -> tuple[dict, dict]:
    trials = {t["k"]: (t["accuracy"], t["params"]) for t in _trials(out, "adamw")}
    finals = {k: v["accuracy"] for k, v in _finals(out).items()}
    return trials, finals


def test_two_workers_on_postgres_run_each_trial_once_and_match_one_worker(tiny_qwen3, tmp_path, postgres_url):
    path = _study(tiny_qwen3, tmp_path / "pg", postgres_url)
    cmd = [sys.executable, "-m", "qwen_ft", "study", "--config", str(path), "--phases", "train", "--optimizers",
           "adamw"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [log[-3000:] for log in logs]
    ran = [[line.split()[1] for line in log.splitlines() if line.startswith("trial ") and "tuning accuracy" in line]
           for log in logs]
    print("trials per worker:", ran)
    assert sorted(k for r in ran for k in r) == sorted(set(k for r in ran for k in r)) and sum(map(len, ran)) == 4
    assert sorted(t["k"] for t in _trials(tmp_path / "pg", "adamw")) == [0, 1, 2, 3]

    import optuna  # the trials live on the server, not in a local file

    assert not (tmp_path / "pg" / "optuna.db").exists()
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    names = [s.study_name for s in optuna.get_all_study_summaries(url) if s.study_name.startswith("adamw")]
    assert len(names) == 1
    done = [t for t in optuna.load_study(study_name=names[0], storage=url).trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["k"] for t in done) == [0, 1, 2, 3]

    solo = _study(tiny_qwen3, tmp_path / "solo", None)  # one worker, SQLite, the same seeds
    run_study(load_study_config([solo]), phases=["train"], only=["adamw"])
    assert _scores(tmp_path / "pg") == _scores(tmp_path / "solo")


def test_a_worker_killed_on_postgres_is_taken_over(tiny_qwen3, tmp_path, postgres_url, monkeypatch):
    from qwen_ft.study import protocol

    # a database of its own: the first test's study names must not be found here
    dbname = "killed"
    subprocess.run(["createdb" if shutil.which("createdb") else str(_server_bin() / "createdb"), "-h", "127.0.0.1",
                    "-p", postgres_url.rsplit(":", 1)[1].split("/")[0], "-U", "postgres", dbname], check=True)
    url = postgres_url.rsplit("/", 1)[0] + "/" + dbname
    out = tmp_path / "k"
    path = _study(tiny_qwen3, out, url)
    script = tmp_path / "kill.py"
    script.write_text(KILL_TRIAL)
    env = {**os.environ, "KILL_AFTER": str(out / "trials" / "adamw" / "trial-0" / "trial.json")}
    proc = subprocess.run([sys.executable, str(script), "study", "--config", str(path), "--phases", "train",
                           "--optimizers", "adamw"], env=env, capture_output=True, text=True)
    assert proc.returncode == -9
    assert [t["k"] for t in _trials(out, "adamw")] == [0]
    monkeypatch.setattr(protocol, "HEARTBEAT_S", 1)  # the killed worker's trial is stale after 3 s
    study = run_study(load_study_config([path]), phases=["train"], only=["adamw"])
    assert [t["k"] for t in _trials(out, "adamw")] == [0, 1, 2, 3]
    assert any(o["name"] == "final[adamw, seed 1]" and o["status"] == "done" for o in study.outcomes)
    print("after the take-over:", json.dumps({t["k"]: t["accuracy"] for t in _trials(out, "adamw")}))
