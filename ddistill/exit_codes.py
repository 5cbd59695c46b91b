"""Exit codes of the `ddistill` commands, in one place (documented in the README, tested through subprocesses).

    0   FINISHED     the command did what it was asked (`train`: train.max_steps reached, or train.stop_after_steps)
    1   FAILED       an unexpected error: the traceback says where (also Python's own code for an uncaught error)
    2   BAD_INPUT    a config, flag, path, checkpoint or out_dir was rejected with one line, before any work was
                     lost or any file overwritten (argparse uses 2 for its usage errors too)
    3   NONFINITE    `train` stopped after train.max_consecutive_nonfinite skipped steps; the last good state is
                     checkpointed (the skipped steps changed nothing)
    75  PREEMPTED    `train` got a preemption signal (SIGTERM, SIGUSR2), checkpointed on every rank and stopped;
                     relaunching the same command resumes it (75 = EX_TEMPFAIL of sysexits.h: "try again later")

It imports nothing from ddistill (like `ddistill.config`), so every layer may use it.
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode", "exit_code_for_stop"]


class ExitCode(enum.IntEnum):
    FINISHED = 0
    FAILED = 1
    BAD_INPUT = 2
    NONFINITE = 3
    PREEMPTED = 75


_STOP_REASONS = {
    "max_steps": ExitCode.FINISHED,
    "stop_after_steps": ExitCode.FINISHED,
    "nonfinite": ExitCode.NONFINITE,
    "preempted": ExitCode.PREEMPTED,
}


def exit_code_for_stop(stop_reason: str) -> ExitCode:
    """The exit code of a training run that returned with `summary["stop_reason"]`."""
    try:
        return _STOP_REASONS[stop_reason]
    except KeyError:
        raise ValueError(f"unknown stop reason {stop_reason!r}; known: {sorted(_STOP_REASONS)}") from None
