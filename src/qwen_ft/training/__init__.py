"""Training: `train(config) -> RunResult`, the one function behind `qwen-ft train`, the seed script,
torchrun/accelerate launches and every study trial.

train.py      the recipe: setup data, setup model, setup trainer, train, finish (the run folder)
inputs.py     the config resolved against the size preset, every input checked at once, tokenized splits
batches.py    left-padded and packed collators, the seeded length-grouped order, the answer-only loss
trainer.py    TrainingArguments from the config (one table), SeededTrainer, the trackers' folders
callbacks.py  metrics.jsonl, the NaN guard, checkpoint triggers and signals, step timing, quiet printing
"""

from qwen_ft.training.inputs import check_inputs, resolve_config
from qwen_ft.training.train import RunResult, train

__all__ = ["RunResult", "check_inputs", "resolve_config", "train"]
