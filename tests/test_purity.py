"""Library calls leave the process as they found it: loading a classifier (and classifying with it) and training
change neither torch's thread counts, nor os.environ, nor glibc's allocator (mallopt); the command's own entry
(`process.setup`) does set them, which also shows that the probe sees such a change.

Each probe runs in a fresh interpreter: thread counts and mallopt are process-wide, and mallopt cannot be undone
or read back, so the probe records every C function looked up through ctypes (the only way Python reaches
mallopt) instead of reading the allocator's settings.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

PROBE = r'''
import ctypes, json, os, sys

looked_up = []
_lookup = ctypes.CDLL.__getitem__


def _record(self, name):
    looked_up.append(str(name))
    return _lookup(self, name)


ctypes.CDLL.__getitem__ = _record  # CDLL.__getattr__ (libc.mallopt) goes through __getitem__ too

import qwen_ft  # first, as a program would: it reads the user's settings
import peft, torch, transformers  # what these set on import is theirs (peft: TORCHINDUCTOR_CACHE_DIR)
from transformers import Trainer, TrainingArguments

torch.set_num_threads(max(2, os.cpu_count() or 1) + 1)  # neither QWEN_FT_THREADS=1 nor the machine's cores


def state():
    return {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "environ": dict(os.environ)}


before = state()
ACTION
after = state()
print(json.dumps({"before": before, "after": after, "mallopt": "mallopt" in looked_up,
                  "gpu": torch.cuda.device_count() > 0}))
'''

LOAD = '''
from qwen_ft.inference.engine import Classifier

clf = Classifier.load(sys.argv[1], precision="fp32")
clf.classify([clf.row("What is the capital of France?")])
'''

TRAIN = '''
from qwen_ft.training import train

train({"model.model": sys.argv[1], "data.data": "demo", "data.max_samples_per_category": 5, "train.epochs": 1,
       "train.batch_size": 8, "model.precision": "fp32", "model.max_length": 256, "train.output_dir": sys.argv[2]})
'''

ENTRY = '''
from qwen_ft import process

process.setup()
'''

# what the entry or a careless library call would set: absent at the start, so that a setdefault shows too
UNSET = ("TOKENIZERS_PARALLELISM", "QWEN_FT_MALLOC", "OMP_NUM_THREADS")


def probe(action: str, *args: str, cache) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update({"QWEN_FT_THREADS": "1", "QWEN_FT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, "-c", PROBE.replace("ACTION", action), *args], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def changed(result: dict) -> dict:
    """What differs between before and after: thread counts, and each environment variable that changed."""
    before, after = result["before"], result["after"]
    out = {k: (before[k], after[k]) for k in ("threads", "interop") if before[k] != after[k]}
    env_b, env_a = before["environ"], after["environ"]
    out.update({f"${k}": (env_b.get(k), env_a.get(k)) for k in sorted(set(env_b) | set(env_a))
                if env_b.get(k) != env_a.get(k)})
    return out


def glibc_linux() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_loading_and_classifying_leave_threads_environment_and_allocator_alone(tiny_run, tmp_path):
    result = probe(LOAD, str(tiny_run), cache=tmp_path / "cache")
    assert changed(result) == {}
    assert not result["mallopt"], "Classifier.load or classify tuned glibc's allocator (mallopt)"


def test_training_leaves_threads_environment_and_allocator_alone(tiny_qwen3, tmp_path):
    result = probe(TRAIN, str(tiny_qwen3), str(tmp_path / "run"), cache=tmp_path / "cache")
    assert (tmp_path / "run" / "adapter_config.json").is_file()  # it did train
    assert changed(result) == {}
    assert not result["mallopt"], "train() tuned glibc's allocator (mallopt)"


def test_the_command_entry_sets_them_and_the_probe_sees_it(tmp_path):
    result = probe(ENTRY, cache=tmp_path / "cache")
    diff = changed(result)
    assert diff.pop("$TOKENIZERS_PARALLELISM") == (None, "false")
    if result["gpu"]:  # a GPU machine keeps torch's thread count and glibc's defaults
        assert diff == {} and not result["mallopt"]
        return
    assert diff == {"threads": (result["before"]["threads"], 1)}  # QWEN_FT_THREADS
    assert result["mallopt"] == glibc_linux()
