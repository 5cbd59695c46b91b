"""Ways to start `python -m ddistill.engine CONFIG key=value ...` on every rank.

* `local`: torchrun on one machine (`--standalone`), or several with an explicit rendezvous.
* `multinode`: the DeepSpeed launcher with a hostfile (pdsh over ssh, or `--no_ssh` one launcher per node).
* `slurm`: submitit, one task per GPU, with preemption checkpoint + requeue and exact resume from disk.

Every builder returns an argv list (nothing is executed until you call the matching `run_*`/`submit`), so
command lines are unit-tested without a cluster.
"""

from ddistill.launchers.local import torchrun_command
from ddistill.launchers.multinode import deepspeed_command, hostfile_text, parse_hostfile, srun_deepspeed_command
from ddistill.launchers.slurm import SlurmConfig, TrainJob, slurm_parameters, submit

__all__ = [
    "torchrun_command",
    "deepspeed_command",
    "hostfile_text",
    "parse_hostfile",
    "srun_deepspeed_command",
    "SlurmConfig",
    "TrainJob",
    "slurm_parameters",
    "submit",
]
