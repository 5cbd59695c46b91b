"""SLURM through submitit: one task per GPU (per CPU slot on CPU partitions), preemption -> checkpoint -> requeue
-> exact resume from disk.

    ddistill submit configs/experiments/owt_mdlm_small.yaml train.max_steps=1000000 --launcher slurm \
        --nodes 2 --gpus-per-node 8 --partition gpu --time 3-00:00:00

    from ddistill.launchers.slurm import SlurmConfig, prepare_job, submit_job
    job = prepare_job(run_cfg, SlurmConfig(folder="runs/slurm/owt-1", nodes=2, gpus_per_node=8), source=...)
    submit_job(job)

The job folder (one per submission) holds everything a task needs and everything it writes:

    <job>/submit.json          what was asked (config file, overrides, argv, world size, git revision, job ids)
    <job>/config.yaml          the resolved run config: every task (and every requeue) trains exactly this
    <job>/code/ddistill/       a frozen copy of the package, first on every task's PYTHONPATH
    <job>/<id>_submission.sh   the sbatch script (identical to `ddistill submit --dry-run`)
    <job>/<id>_<rank>_log.out  one log per rank (stderr in .err), appended across requeues

Tasks start in the job folder (`#SBATCH --chdir`): `python -m` puts the working directory first on sys.path, and a
source checkout there would shadow the snapshot. Relative paths of the run config are made absolute at submission.

Preemption and time limits (submitit's `--signal=USR2@signal_delay_s` reaches every task, no `B:` prefix):
1. the trainer's own handler (installed after submitit's) only records the signal and sets a flag;
2. at the next step boundary the flag is all-reduced, so every rank sees it at the same step;
3. all ranks write one checkpoint (ZeRO saves are collective, so submitit's rank-0 hook inside a signal handler
   could not) and leave the training loop;
4. SIGUSR2 (time limit, or a preemption announced with a signal): rank 0 hands it to submitit's handler, which
   pickles `TrainJob.checkpoint()` (a fresh job, no engine state) and runs `scontrol requeue`. submitit
   counts a requeue as a time-out when the job ran past min(0.8 T, T - 10 min) of its limit T and stops after
   `max_num_timeout` of them; other requeues are unbounded. SIGTERM (`scontrol requeue`, `scancel`, a
   PreemptMode=REQUEUE preemption, the time limit itself): SLURM already decides what comes next, so every rank
   just returns after its checkpoint (which must fit in the cluster's KillWait).
The requeued job resumes from the newest complete checkpoint in `train.out_dir`: state always comes from disk,
never from the pickle, so a node-failure requeue (which replays the original pickle) resumes the same way. A
checkpoint directory only gets its final name once complete (engine/checkpoint.py), so `scancel` leaves a complete
checkpoint or none.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ddistill.launchers.world import check_world_size

__all__ = ["SlurmConfig", "parse_time", "slurm_parameters", "sbatch_script", "task_command", "JobSpec",
           "prepare_job", "write_job_folder", "submit_job", "TrainJob", "make_executor", "snapshot_code", "JOB_CONFIG",
           "JOB_META"]

JOB_CONFIG = "config.yaml"
JOB_META = "submit.json"
CODE_DIR = "code"


def parse_time(text: str | int) -> int:
    """SLURM time strings -> whole minutes (rounded up, as SLURM does): "90", "1:30:00", "2-00", "2-12:00:00"."""
    if isinstance(text, int):
        minutes = text
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
        if not match:
            raise ValueError(f"time {text!r} is not a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)")
        days, a, b, c = match.groups()
        if days is None:  # MM | MM:SS | HH:MM:SS
            if c is not None:
                seconds = int(a) * 3600 + int(b) * 60 + int(c)
            elif b is not None:
                seconds = int(a) * 60 + int(b)
            else:
                seconds = int(a) * 60
        else:  # D-HH | D-HH:MM | D-HH:MM:SS
            seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
        minutes = -(-seconds // 60)
    if minutes < 1:
        raise ValueError(f"time {text!r}: the limit must be at least one minute")
    return minutes


@dataclass(kw_only=True)
class SlurmConfig:
    """What `sbatch` is asked for. One task per GPU; on CPU partitions (gpus_per_node=0) tasks_per_node says how
    many ranks share a node (one per CPU slot of cpus_per_task CPUs)."""

    folder: str  # the job folder (see the module docstring)
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: gpus_per_node
    cpus_per_task: int = 8
    mem: str | None = None  # sbatch --mem, e.g. "200G"; None = the partition's default
    timeout_min: int = 4320
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    job_name: str = "ddistill"
    signal_delay_s: int = 300  # > one step + one checkpoint write
    max_num_timeout: int = 20  # requeues after a time-out (preemptions requeue without limit)
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, NCCL_* exports)
    additional: dict[str, Any] = field(default_factory=dict)  # raw #SBATCH --key=value

    def __post_init__(self) -> None:
        if self.tasks_per_node is None:
            if self.gpus_per_node < 1:
                raise ValueError("gpus_per_node=0 (a CPU partition) needs tasks_per_node: ranks per node")
            self.tasks_per_node = self.gpus_per_node
        if self.nodes < 1 or self.gpus_per_node < 0 or self.tasks_per_node < 1 or self.cpus_per_task < 1:
            raise ValueError(f"nodes={self.nodes}, gpus_per_node={self.gpus_per_node}, tasks_per_node="
                             f"{self.tasks_per_node}, cpus_per_task={self.cpus_per_task}: need nodes, tasks and "
                             "CPUs >= 1 and gpus_per_node >= 0")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: "
                             "ddistill runs one rank per GPU")
        if not 0 < self.signal_delay_s < self.timeout_min * 60:
            raise ValueError(f"signal_delay_s={self.signal_delay_s} must lie in (0, time limit="
                             f"{self.timeout_min * 60} s): the warning would come before the job starts")
        if self.max_num_timeout < 0:
            raise ValueError(f"max_num_timeout={self.max_num_timeout} must be >= 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def slurm_parameters(cfg: SlurmConfig) -> dict[str, Any]:
    """submitit's SLURM parameters (the keyword names of its sbatch writer) for this job."""
    folder = Path(cfg.folder).absolute()
    params: dict[str, Any] = {
        "job_name": cfg.job_name,
        "nodes": cfg.nodes,
        "ntasks_per_node": cfg.tasks_per_node,  # one rank per task, started directly by srun
        "cpus_per_task": cfg.cpus_per_task,
        "time": cfg.timeout_min,
        "signal_delay_s": cfg.signal_delay_s,
        "setup": [
            f"export PYTHONPATH={shlex.quote(str(folder / CODE_DIR))}${{PYTHONPATH:+:$PYTHONPATH}}",
            f"export OMP_NUM_THREADS={cfg.cpus_per_task}",
            "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
            *cfg.setup,
        ],
        # Append, so that a requeued task's log continues its first attempt's.
        "srun_args": ["--cpu-bind=none", "--open-mode=append"],
        # Tasks start in the job folder, so `python -m` puts no source checkout before the code snapshot.
        "additional_parameters": {"requeue": True, "chdir": str(folder), **cfg.additional},
    }
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    for key in ("mem", "partition", "account", "qos", "constraint"):
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    if cfg.exclusive:
        params["exclusive"] = True
    return params


def _submitit_command(folder: Path) -> str:
    # The line submitit's SlurmExecutor runs on every task (SlurmExecutor._submitit_command_str).
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: SlurmConfig) -> str:
    """The sbatch script submitit writes for this job (no SLURM needed to compute it)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(cfg.folder).absolute()
    return _make_sbatch_string(command=_submitit_command(folder), folder=folder, **slurm_parameters(cfg))


def task_command(job_dir: str | Path) -> str:
    """What every task runs, as a command line: the resolved config of the job, no overrides."""
    return shlex.join(["ddistill", "train", str(Path(job_dir).absolute() / JOB_CONFIG)])


@dataclass(kw_only=True)
class JobSpec:
    """A job ready to submit: the SLURM request and the resolved run config."""

    slurm: SlurmConfig
    run_config: Any  # ddistill.engine.RunConfig, with absolute paths
    source: dict[str, Any]  # config file, overrides, argv: recorded in submit.json

    @property
    def folder(self) -> Path:
        return Path(self.slurm.folder).absolute()


def _absolute(value: str | None) -> str | None:
    """A relative local path (or glob that matches) made absolute; anything else (hub ids, None) unchanged."""
    if value is None or os.path.isabs(value) or not (Path(value).exists() or glob.glob(value)):
        return value
    return os.path.abspath(value)


def _absolute_paths(run_cfg):
    """The run config with its local paths absolute: tasks run in the job folder, not where you submitted."""
    import dataclasses

    data = dataclasses.replace(run_cfg.data, **{key: _absolute(getattr(run_cfg.data, key)) for key in
                                                ("path", "valid_path", "cache_dir", "datasets_cache_dir", "tokenizer")})
    train = dataclasses.replace(run_cfg.train, out_dir=os.path.abspath(run_cfg.train.out_dir))
    return dataclasses.replace(run_cfg, data=data, train=train, init_from=_absolute(run_cfg.init_from))


def prepare_job(run_cfg, slurm: SlurmConfig, *, source: dict[str, Any]) -> JobSpec:
    """Check the run against the allocation before anything is queued; paths made absolute.

    Raises ConfigError (global batch not divisible by micro-batch x world size, a CUDA run without GPUs, a CPU
    run holding GPUs) or ValueError (the job folder already holds something).
    """
    from ddistill.config import ConfigError

    tc = run_cfg.train
    check_world_size(tc, slurm.world_size, layout=f"{slurm.nodes} nodes x {slurm.tasks_per_node} tasks per node")
    if slurm.gpus_per_node == 0 and tc.device == "cuda":
        raise ConfigError("train.device=cuda but --gpus-per-node 0: ask for GPUs or set train.device=cpu")
    if slurm.gpus_per_node > 0 and tc.device == "cpu":
        raise ConfigError(f"train.device=cpu with --gpus-per-node {slurm.gpus_per_node}: the GPUs would sit idle; "
                          "use --gpus-per-node 0 --tasks-per-node N for a CPU run")
    folder = Path(slurm.folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"job folder {folder} already holds files; choose a new --job-dir")
    return JobSpec(slurm=slurm, run_config=_absolute_paths(run_cfg), source=source)


def snapshot_code(dest: Path) -> Path:
    """Copy the ddistill package that is running now into dest/ddistill (no caches); returns that directory."""
    import ddistill

    package = Path(ddistill.__file__).resolve().parent
    target = Path(dest) / "ddistill"
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _git_revision() -> str | None:
    import ddistill

    root = Path(ddistill.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return os.environ.get("DDISTILL_GIT_REV")
    if rev.returncode != 0:
        return os.environ.get("DDISTILL_GIT_REV")
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_job_folder(job: JobSpec) -> None:
    """config.yaml, the code snapshot and submit.json (before submission)."""
    from ddistill.config import dump_yaml

    folder = job.folder
    folder.mkdir(parents=True, exist_ok=True)
    dump_yaml(job.run_config.to_dict(), folder / JOB_CONFIG)
    snapshot_code(folder / CODE_DIR)
    meta = {**job.source, "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_revision": _git_revision(), "nodes": job.slurm.nodes, "tasks_per_node": job.slurm.tasks_per_node,
            "gpus_per_node": job.slurm.gpus_per_node, "world_size": job.slurm.world_size,
            "out_dir": job.run_config.train.out_dir, "task_command": task_command(folder), "job_ids": []}
    (folder / JOB_META).write_text(json.dumps(meta, indent=1))


def _record_job_id(folder: Path, job_id: str) -> None:
    meta = json.loads((folder / JOB_META).read_text())
    meta["job_ids"].append(job_id)
    tmp = folder / (JOB_META + ".part")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / JOB_META)


def submit_job(job: JobSpec, *, cluster: str = "slurm"):
    """Write the job folder and submit it (cluster "slurm": sbatch; "local": submitit's LocalExecutor on this
    machine, same signal/requeue machinery, but it runs the submitting process's code, not the snapshot).
    Returns the submitit Job."""
    executor = make_executor(job.slurm, cluster=cluster)
    write_job_folder(job)
    submitted = executor.submit(TrainJob(str(job.folder / JOB_CONFIG)))
    _record_job_id(job.folder, str(submitted.job_id))
    return submitted


class TrainJob:
    """The submitit callable: run (or resume) training on every task; checkpoint + requeue on preemption."""

    def __init__(self, config: str, overrides: Sequence[str] = ()):
        self.config = str(config)
        self.overrides = list(overrides)

    def __call__(self) -> dict[str, Any]:
        import submitit

        import ddistill
        from ddistill.engine import load_run_config
        from ddistill.engine import trainer as trainer_module

        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from the SLURM (or local-executor) task; keep all GPUs visible so
        # that DeepSpeed's set_device(LOCAL_RANK) is valid.
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(f"ddistill task rank {env.rank}/{env.world_size} pid {os.getpid()} on {env.master_addr}:"
              f"{env.master_port}, code "
              f"{Path(ddistill.__file__).parent}, restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
        summary = self.run(load_run_config(self.config, self.overrides))
        if summary["preempted"] and summary.get("preempt_signal") == "SIGUSR2" and int(os.environ["RANK"]) == 0:
            handler = trainer_module.PREVIOUS_HANDLERS.get(signal.SIGUSR2)
            if callable(handler):  # submitit's: calls __submitit_checkpoint__, requeues, exits
                handler(signal.SIGUSR2, None)
        return summary

    def run(self, cfg) -> dict[str, Any]:
        from ddistill.engine import run_training

        return run_training(cfg)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's Checkpointable hook (its requeue handler requires a method of this name): a fresh job with
        the original arguments; all state is resumed from the checkpoint on disk."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.config, self.overrides))


def make_executor(cfg: SlurmConfig, *, cluster: str = "slurm"):
    """A submitit executor: "slurm" (sbatch; needs srun on the PATH) or "local" (real processes on this machine,
    same signal/requeue machinery; single node, for tests and workstations)."""
    import submitit

    if cluster == "local":
        if cfg.nodes != 1:
            raise ValueError("the local executor runs on one node; set nodes=1")
        Path(cfg.folder).mkdir(parents=True, exist_ok=True)
        executor = submitit.LocalExecutor(folder=cfg.folder, max_num_timeout=cfg.max_num_timeout)
        params: dict[str, Any] = {"timeout_min": cfg.timeout_min, "tasks_per_node": cfg.tasks_per_node,
                                  "signal_delay_s": cfg.signal_delay_s}
        if cfg.gpus_per_node and _has_cuda():
            params["gpus_per_node"] = cfg.gpus_per_node
        executor.update_parameters(**params)
        return executor
    if cluster != "slurm":
        raise ValueError(f"cluster={cluster!r}; allowed values: ['slurm', 'local']")
    if shutil.which("srun") is None:
        raise RuntimeError("SLURM's srun is not on the PATH: this machine cannot submit SLURM jobs "
                           "(use --cluster local to run the job here through submitit's local executor)")
    Path(cfg.folder).mkdir(parents=True, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=cfg.folder, max_num_timeout=cfg.max_num_timeout)
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
