"""Run observability on rank 0: a tqdm bar (loss, tokens/s, ETA), a JSONL metrics file and Weights & Biases.

wandb is imported only when enabled (`logging.wandb` offline|online); tests use `disabled`. The wandb run id is kept
in `out_dir/wandb_run_id`, so a resumed run continues the same wandb run. Peak memory is the CUDA allocator's peak
on GPU and the process's peak RSS on CPU (both per rank, gathered by the trainer).

`metrics.jsonl` holds one JSON record per logged step; a resume first cuts it back to the records of the steps up to
its checkpoint (`truncate_metrics`), so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["MetricsLogger", "peak_memory_gib", "truncate_metrics", "wandb_run_id", "WANDB_ID_FILE"]

WANDB_ID_FILE = "wandb_run_id"


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _plain(value: Any) -> Any:
    if torch.is_tensor(value):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of `path` with step <= last_step (and drop a line cut by a kill), atomically; returns the
    number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            step = None
        if isinstance(step, int) and step <= last_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".part")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def wandb_run_id(out_dir: Path, new_id) -> str:
    """The wandb run id of the run in out_dir: read from out_dir/wandb_run_id, or `new_id()` written there."""
    path = Path(out_dir) / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = str(new_id())
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)
    return run_id


class MetricsLogger:
    """Writes metrics on rank 0 only; every other rank gets a logger whose methods do nothing."""

    def __init__(self, *, out_dir: Path, enabled: bool, jsonl: bool, wandb_mode: str, project: str,
                 run_name: str | None, config: dict, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if wandb_mode != "disabled":
            import wandb

            run_id = wandb_run_id(out_dir, wandb.util.generate_id)
            self._wandb = wandb.init(project=project, name=run_name, mode=wandb_mode, dir=str(out_dir),
                                     config=config, id=run_id, resume="allow")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def progress(self, step: int, loss: float | None, tokens_per_s: float) -> None:
        """loss None: every step of the window was skipped (non-finite)."""
        if self._bar is not None:
            self._bar.n = step
            shown = "skipped" if loss is None else f"{loss:.4f}"
            self._bar.set_postfix(loss=shown, tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
