"""`qwen-ft` command line: argument parsing only; each subcommand lives in qwen_ft.commands.

Flags of `train` are generated from the config dataclasses (each field's help and flag live there once).
Only flags given explicitly reach the config, so that precedence (preset < YAML < env < CLI) holds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import re
import sys

from qwen_ft import __version__, malloc, process
from qwen_ft import distributed as dist
from qwen_ft.errors import UserError, from_os_error

COMMANDS = {"train": "train", "validate": "validate", "test": "predict", "merge": "merge", "study": "study",
            "predict": "predict_file", "serve": "serve", "mcp": "mcp", "study-compare": "study_compare"}
# the commands that run a model in this process: they fix the thread count and the allocator (process.setup)
COMPUTES = {"train", "validate", "test", "predict", "serve", "mcp", "study"}


def quiet_libraries(debug: bool) -> None:
    """Library progress bars and deprecation chatter hide our own progress lines."""
    if debug:
        return
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    for name in ("optuna", "optuna.study._optimize"):  # a failed study trial: reported once, by us
        logging.getLogger(name).addFilter(_no_user_error_tracebacks)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


class Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--mode` must never be taken for `--model`), for every subcommand too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if "--mode" in message:
            message += ("\n--mode belongs to ft_qwen3_generative_lora.py; qwen-ft takes the mode as its command: "
                        "qwen-ft train | validate | test")
        super().error(message)


def _no_user_error_tracebacks(record: logging.LogRecord) -> bool:
    """Drop library log records that carry a traceback of a UserError (it is reported once, without one)."""
    return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qwen-ft", description="LoRA-fine-tune a causal LM to generate a category label or an answer letter.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks.")
    parser.add_argument("--version", action="version", version=f"qwen-ft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(f"qwen_ft.commands.{module}") is not None:
            importlib.import_module(f"qwen_ft.commands.{module}").add_parser(sub, name)
    return parser


def run() -> int:
    """The `qwen-ft` command and `python -m qwen_ft`: the process's own entry, which may restart the process once
    with glibc's tunables (malloc.relaunch_with_huge_pages) before it reads anything. Python callers use main(),
    which runs the command as the process's own (its threads and allocator: process.setup) but never restarts it."""
    malloc.relaunch_with_huge_pages()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    dist.setup_logging(debug)
    quiet_libraries(debug)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message (or the help)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    name = f"qwen-ft {args.command}{dist.rank_tag()}"
    try:
        process.setup(compute=args.command in COMPUTES)  # the command's, once: no library call sets these
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        error = user_error(e)
        if error is None:  # a bug of ours: the traceback is for the report
            import traceback

            traceback.print_exc()
            print(f"{name}: internal error (a bug in qwen-ft, not a problem with your input): "
                  f"{type(e).__name__}: {e}\nPlease report it with the command line and the traceback above.",
                  file=sys.stderr)
            return 1
        print(f"{name}: error: {error.message}", file=sys.stderr)
        return 2
    finally:
        logging.shutdown()
    return 0


def user_error(e: BaseException) -> UserError | None:
    """The user-facing error for an exception escaping a command, or None for an internal error.

    UserError: as it is. OSError anywhere in the chain (full disk, read-only or missing folder, a file where a
    folder should be), and running out of memory: the user's environment, so one message, no traceback.
    """
    if isinstance(e, UserError):
        return e
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, UserError):
            return cause
        if isinstance(cause, OSError):
            return from_os_error(cause)
        os_error = re.search(r"\(os error (\d+)\)", str(cause))  # Rust I/O errors (safetensors, tokenizers)
        if os_error:
            code = int(os_error.group(1))
            return from_os_error(OSError(code, f"{os.strerror(code)} ({type(cause).__name__}: {cause})"))
        if isinstance(cause, MemoryError) or type(cause).__name__ == "OutOfMemoryError":
            return UserError(f"out of memory: {cause}".rstrip(": "),
                             "Use a smaller --batch-size or --max-length, gradient checkpointing, or bf16.")
        cause = cause.__cause__ or cause.__context__
    return None
