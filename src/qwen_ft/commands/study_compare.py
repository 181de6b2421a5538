"""`qwen-ft study-compare STUDY STUDY ... --output-dir DIR`: does a verdict hold across workloads?

A performance profile (Dolan-More) over finished studies: for each optimizer, the fraction of workloads on
which its mean final accuracy is within tau points of that workload's best optimizer."""

from __future__ import annotations

from pathlib import Path

from qwen_ft.errors import UserError


def run(studies: list[str], output_dir: str) -> dict:
    from qwen_ft.study.load import StudyFolder
    from qwen_ft.study.report import write_cross_workload

    missing = [s for s in studies if not StudyFolder(Path(s)).has_spec()]
    if missing:
        raise UserError(f"not a finished study folder (no study.json): {', '.join(missing)}",
                        "Pass output_dir folders of studies whose analysis phase has run.")
    if len(studies) < 2:
        raise UserError("pass at least two study folders to compare")
    return write_cross_workload([Path(s) for s in studies], Path(output_dir))


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Compare finished optimizer studies across workloads (performance profile).")
    p.add_argument("studies", nargs="+", help="Study folders (their output_dir).")
    p.add_argument("--output-dir", required=True, help="Where performance_profile.png and the table go.")
    p.set_defaults(func=lambda a: run(a.studies, a.output_dir))
