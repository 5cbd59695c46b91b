"""SLURM through submitit: one task per GPU, preemption -> checkpoint -> requeue -> exact resume.

    from ddistill.launchers import SlurmConfig, submit
    job = submit("configs/experiments/owt_mdlm_small.yaml", ["train.max_steps=1000000"],
                 SlurmConfig(folder="runs/slurm", nodes=2, gpus_per_node=8, partition="gpu", timeout_min=4320))

How preemption works (SLURM sends SIGUSR2 `signal_delay_s` before the end, to every task because the sbatch
`--signal` has no `B:` prefix):
1. the trainer's own handler (installed after submitit's) only sets a flag;
2. at the next step boundary the flag is all-reduced, so every rank sees it at the same step;
3. all ranks write a checkpoint (ZeRO saves are collective; submitit's hook runs on rank 0 only and inside a
   signal handler, so it could not) and leave the training loop;
4. rank 0 hands the signal to submitit's handler, which calls `TrainJob.__submitit_checkpoint__` (a fresh job
   with the original arguments, no engine state) and requeues the job (`scontrol requeue`; exit code 144 locally).
The requeued job resumes from the newest complete checkpoint in `train.out_dir`: state always comes from disk, so
a node-failure requeue (which replays the original pickle) resumes the same way.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["SlurmConfig", "slurm_parameters", "TrainJob", "make_executor", "submit"]


@dataclass(kw_only=True)
class SlurmConfig:
    folder: str  # submitit logs and pickles
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem_gb: float | None = None
    timeout_min: int = 4320
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "ddistill"
    signal_delay_s: int = 300  # > one step + one checkpoint write
    max_num_timeout: int = 20  # requeues after a time-out (preemptions requeue without limit)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, NCCL_* exports)
    additional: dict[str, Any] = field(default_factory=dict)  # raw #SBATCH --key=value

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"nodes={self.nodes} and gpus_per_node={self.gpus_per_node} must be >= 1")
        if not 0 < self.signal_delay_s < self.timeout_min * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} must lie in (0, timeout_min*60="
                             f"{self.timeout_min * 60}): the preemption warning would come before the job starts")


def slurm_parameters(cfg: SlurmConfig) -> dict[str, Any]:
    """Keyword arguments for `executor.update_parameters` (generic names + slurm_* ones)."""
    params: dict[str, Any] = {
        "name": cfg.job_name,
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.gpus_per_node,  # one rank per GPU, started directly by srun
        "gpus_per_node": cfg.gpus_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "timeout_min": cfg.timeout_min,
        "slurm_signal_delay_s": cfg.signal_delay_s,
        "slurm_setup": ["export OMP_NUM_THREADS=1", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", *cfg.setup],
        "slurm_srun_args": ["--cpu-bind=none"],
    }
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key) is not None:
            params[f"slurm_{key}"] = getattr(cfg, key)
    if cfg.additional:
        params["slurm_additional_parameters"] = dict(cfg.additional)
    return params


class TrainJob:
    """The submitit callable: run (or resume) training on every task; checkpoint + requeue on preemption."""

    def __init__(self, config: str, overrides: Sequence[str] = ()):
        self.config = str(config)
        self.overrides = list(overrides)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from ddistill.engine import load_run_config
        from ddistill.engine import trainer as trainer_module

        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the SLURM (or local-executor) task; keep all GPUs visible so
        # that DeepSpeed's set_device(LOCAL_RANK) is valid.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        summary = self.run(load_run_config(self.config, self.overrides))
        if summary["preempted"] and int(os.environ["RANK"]) == 0:
            handler = trainer_module.PREVIOUS_HANDLERS.get(signal.SIGUSR2)
            if callable(handler):  # submitit's: calls __submitit_checkpoint__, requeues, exits
                handler(signal.SIGUSR2, None)
        return summary

    def run(self, cfg) -> dict[str, Any]:
        from ddistill.engine import run_training

        return run_training(cfg)

    def __submitit_checkpoint__(self, *args: Any, **kwargs: Any):
        """A fresh job with the original arguments: all state is resumed from the checkpoint on disk."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.overrides))


def make_executor(cfg: SlurmConfig, *, cluster: str | None = None):
    """A submitit executor: SLURM (cluster None/"slurm"), or "local" (real processes on this machine, same
    signal/requeue machinery; single node, for tests and workstations)."""
    import submitit

    Path(cfg.folder).mkdir(parents=True, exist_ok=True)
    if cluster == "local":
        if cfg.nodes != 1:
            raise ValueError("the local executor runs on one node; set nodes=1")
        executor = submitit.LocalExecutor(folder=cfg.folder, max_num_timeout=cfg.max_num_timeout)
        params: dict[str, Any] = {"timeout_min": cfg.timeout_min, "tasks_per_node": cfg.gpus_per_node,
                                  "signal_delay_s": cfg.signal_delay_s}
        if _has_cuda():
            params["gpus_per_node"] = cfg.gpus_per_node
        executor.update_parameters(**params)
        return executor
    if cluster not in (None, "slurm"):
        raise ValueError(f"cluster={cluster!r}; allowed values: [None, 'slurm', 'local']")
    executor = submitit.AutoExecutor(folder=cfg.folder, cluster=cluster, slurm_max_num_timeout=cfg.max_num_timeout)
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def submit(config: str, overrides: Sequence[str], cfg: SlurmConfig, *, cluster: str | None = None):
    """Submit one training job; returns the submitit Job."""
    return make_executor(cfg, cluster=cluster).submit(TrainJob(config, overrides))
