"""`ddistill jobs FOLDER`: the runs submitted into a folder, with their state, step and last loss.

Each job folder written by `ddistill submit` (launchers/slurm.py) holds submit.json (job ids, out_dir). The state
comes from `squeue` while SLURM still knows the job (PENDING, RUNNING, COMPLETING, ...; no accounting database
needed), otherwise from submitit's result file of rank 0: FINISHED (reached max_steps), PREEMPTED (checkpointed
on a signal and not requeued, e.g. after `scancel`), STOPPED (another stop: non-finite losses, stop_after_steps),
FAILED (an exception; its last line is shown), or ENDED (no result: killed before it could write one). Step and
loss are the last logged record of `<out_dir>/metrics.jsonl`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["final_state", "list_jobs", "format_jobs"]


def final_state(result: tuple[str, Any] | None) -> tuple[str, str]:
    """(state, detail) of a job SLURM no longer lists, from submitit's (kind, value) result of rank 0."""
    if result is None:
        return "ENDED", "no result file (killed, or still starting)"
    kind, value = result
    if kind == "success" and isinstance(value, dict):
        reason = value.get("stop_reason")
        if reason == "max_steps":
            return "FINISHED", ""
        if reason == "preempted":
            return "PREEMPTED", f"checkpoint at step {value.get('step')}"
        return "STOPPED", str(reason)
    if kind == "error":
        lines = [line for line in str(value).strip().splitlines() if line.strip()]
        return "FAILED", lines[-1] if lines else ""
    return "ENDED", f"unexpected result {kind!r}"


def _squeue_states(job_ids: list[str]) -> dict[str, str]:
    if not job_ids or shutil.which("squeue") is None:
        return {}
    proc = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:  # e.g. all ids unknown to the controller
        return {}
    return dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())


def _result(folder: Path, job_id: str) -> tuple[str, Any] | None:
    path = folder / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)  # written by submitit in this job folder


def _last_record(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    for line in reversed(path.read_text().splitlines()):
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                return record
    return {}


def list_jobs(folder: str | Path) -> list[dict[str, Any]]:
    """One row per job folder under `folder` (or `folder` itself if it is one), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    metas = [folder / "submit.json"] if (folder / "submit.json").is_file() else sorted(folder.glob("*/submit.json"))
    entries = [(path.parent, json.loads(path.read_text())) for path in metas]
    live = _squeue_states([meta["job_ids"][-1] for _, meta in entries if meta.get("job_ids")])
    rows = []
    for job_dir, meta in entries:
        job_id = meta["job_ids"][-1] if meta.get("job_ids") else None
        if job_id is None:
            state, detail = "UNSUBMITTED", "sbatch did not return a job id"
        elif job_id in live:
            state, detail = live[job_id], ""
        else:
            state, detail = final_state(_result(job_dir, job_id))
        record = _last_record(Path(meta["out_dir"]))
        rows.append({"job_dir": str(job_dir), "job_id": job_id, "state": state, "detail": detail,
                     "step": record.get("step"), "loss": record.get("loss"), "out_dir": meta["out_dir"],
                     "created": meta.get("created")})
    return sorted(rows, key=lambda row: row["created"] or "")


def format_jobs(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of list_jobs' rows."""
    header = ["job", "id", "state", "step", "loss", "out_dir", "detail"]
    body = [[Path(r["job_dir"]).name, r["job_id"] or "-", r["state"], "-" if r["step"] is None else str(r["step"]),
             "-" if r["loss"] is None else f"{r['loss']:.4f}", r["out_dir"], r["detail"]] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body])
