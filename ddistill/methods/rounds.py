"""Round bookkeeping shared by the multi-round distillation methods (SDTT arXiv 2410.21035, DCD arXiv 2506.10892 §4.2).

A run of R rounds of S optimizer steps each: step n (0-based) belongs to round min(⌊n/S⌋, R − 1) (the last round
extends past its end). After optimizer step n, when step n + 1 belongs to the next round, the frozen teacher becomes
the student (its raw weights, or its EMA), the student's optimizer is optionally reset, and the round advances. The
students of a run are the checkpoints at the round boundaries r·S, r = 1…R (EMA weights of the student); a method
lists them through `Method.eval_students` with `RoundTracker.eval_students`.

The state saved with every checkpoint is the round, the step at which the teacher was last replaced, and the
schedule signature (the config fields that decide which step is in which round, plus the method's own ones): a
checkpoint whose signature differs from the run's config is refused, since the schedule cannot change mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ddistill.methods.base import EvalStudent, NetworkControl

__all__ = ["RoundSchedule", "RoundTracker"]


@dataclass(frozen=True, kw_only=True)
class RoundSchedule:
    """R = num_rounds rounds of S = steps_per_round optimizer steps; what happens at each boundary."""

    num_rounds: int
    steps_per_round: int
    teacher_from: Literal["raw", "ema"] = "raw"
    reset_optimizer: bool = False
    student: str = "student"
    teacher: str = "teacher"

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ValueError(f"method.num_rounds={self.num_rounds} must be >= 1")
        if self.steps_per_round < 1:
            raise ValueError(f"method.steps_per_round={self.steps_per_round} must be >= 1")
        if self.teacher_from not in ("raw", "ema"):
            raise ValueError(f"method.teacher_from={self.teacher_from!r}; allowed values: ['raw', 'ema']")

    def round_of_step(self, step: int) -> int:
        """The round that optimizer step `step` (0-based) belongs to; the last round extends past its end."""
        return min(step // self.steps_per_round, self.num_rounds - 1)

    def boundary_steps(self) -> list[int]:
        """Completed-step counts whose checkpoints hold the students of rounds 1…R: r·S."""
        return [r * self.steps_per_round for r in range(1, self.num_rounds + 1)]

    def signature(self) -> dict[str, int]:
        return {"num_rounds": self.num_rounds, "steps_per_round": self.steps_per_round}


class RoundTracker:
    """The current round of a run, the teacher swap at round boundaries, and their checkpoint state.

    `extra_signature` holds the method's own fields that must not change in the middle of a run (SDTT: its step
    counts); it is saved and checked with the schedule's."""

    def __init__(self, schedule: RoundSchedule, *, extra_signature: Mapping[str, Any] | None = None, method: str):
        self.schedule = schedule
        self.method = method
        self.signature = {**schedule.signature(), **dict(extra_signature or {})}
        self.round = 0
        self.teacher_updated_at = 0  # number of optimizer steps done when the teacher was last replaced

    def check_step(self, step: int) -> None:
        """Refuse a step of another round than the tracked one (a checkpoint restored without the method state)."""
        expected = self.schedule.round_of_step(step)
        if expected != self.round:
            raise RuntimeError(
                f"{self.method} is in round {self.round} but optimizer step {step} belongs to round {expected} "
                f"(steps_per_round={self.schedule.steps_per_round}); was the method state restored with the "
                f"checkpoint?"
            )

    def on_step_end(self, step: int, control: NetworkControl) -> bool:
        """After optimizer step `step`: at a round boundary teacher ← student; returns whether the round advanced."""
        next_round = self.schedule.round_of_step(step + 1)
        if next_round == self.round:
            return False
        assert next_round == self.round + 1, (self.round, next_round, step)
        s = self.schedule
        control.copy_weights(s.teacher, s.student, use_ema=s.teacher_from == "ema")
        if s.reset_optimizer:
            control.reset_optimizer(s.student)
        self.round = next_round
        self.teacher_updated_at = step + 1
        return True

    def eval_students(
        self, sampler: Literal["mdlm", "duo", "dimo"], trained_steps: Callable[[int], int | None] = lambda r: None
    ) -> list[EvalStudent]:
        """The student of round r (1-based) is the EMA student of the checkpoint at step r·S;
        trained_steps(r) gives the sampling steps it was distilled for."""
        return [
            EvalStudent(label=f"round {r}", step=step, network=self.schedule.student, sampler=sampler,
                        trained_steps=trained_steps(r))
            for r, step in enumerate(self.schedule.boundary_steps(), start=1)
        ]  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "teacher_updated_at": self.teacher_updated_at, **self.signature}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in self.signature.items():
            if state.get(key) != value:
                raise ValueError(
                    f"method.{key}={value} differs from the checkpoint's {state.get(key)!r}: {self.method}'s round "
                    f"schedule cannot change in the middle of a run"
                )
        round_index = int(state["round"])
        if not 0 <= round_index < self.schedule.num_rounds:
            raise ValueError(f"checkpoint round {round_index} is outside [0, {self.schedule.num_rounds})")
        self.round = round_index
        self.teacher_updated_at = int(state["teacher_updated_at"])
