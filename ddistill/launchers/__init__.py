"""Ways to start `python -m ddistill.engine CONFIG key=value ...` on every rank.

* `local`: torchrun on one machine (`--standalone`), or several with an explicit rendezvous.
* `multinode`: the DeepSpeed launcher with a hostfile (pdsh over ssh, or `--no_ssh` one launcher per node), and
  the hostfile of a SLURM allocation.
* `slurm`: submitit, one task per GPU, with preemption checkpoint + requeue and exact resume from disk; the job
  folder (resolved config, code snapshot, one log per rank).
* `jobs`: the state, step and last loss of the jobs in a folder.
* `world`: the world size a launch will have, checked against the run config before anything starts.

Every builder returns an argv list or a script text (nothing is executed until you call the matching
`run_*`/`submit_job`), so command lines are unit-tested without a cluster.
"""

from ddistill.launchers.jobs import format_jobs, list_jobs
from ddistill.launchers.local import torchrun_command
from ddistill.launchers.multinode import (
    deepspeed_command,
    hostfile_from_slurm,
    hostfile_text,
    parse_hostfile,
    slurm_hostnames,
    srun_deepspeed_command,
)
from ddistill.launchers.slurm import (
    SlurmConfig,
    TrainJob,
    parse_time,
    prepare_job,
    sbatch_script,
    slurm_parameters,
    submit_job,
    task_command,
)
from ddistill.launchers.world import check_world_size

__all__ = [
    "torchrun_command",
    "deepspeed_command",
    "hostfile_text",
    "hostfile_from_slurm",
    "parse_hostfile",
    "slurm_hostnames",
    "srun_deepspeed_command",
    "SlurmConfig",
    "TrainJob",
    "parse_time",
    "prepare_job",
    "sbatch_script",
    "slurm_parameters",
    "submit_job",
    "task_command",
    "check_world_size",
    "list_jobs",
    "format_jobs",
]
