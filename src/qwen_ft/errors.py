"""User-facing errors: one clear message, a non-zero exit, no traceback (unless --debug)."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data, bad folder). Carries every problem found."""

    def __init__(self, problems: str | list[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems found:\n" + "\n".join(f"  - {p}" for p in self.problems)
        return f"{text}\n{self.hint}" if self.hint else text


class TrainingDiverged(UserError):
    """Loss or gradient became NaN/inf during training."""


class Problems:
    """Collects problems so that validation can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, problem: str) -> None:
        self.items.append(problem)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.items.append(problem)

    def raise_if_any(self, hint: str | None = None) -> None:
        if self.items:
            raise UserError(self.items, hint)
