"""torchrun command lines for one machine (or a hand-made multi-node rendezvous).

    torchrun --standalone --nproc_per_node 2 -m ddistill.engine configs/experiments/owt_mdlm_small.yaml k=v
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

__all__ = ["torchrun_command", "run_torchrun"]


def torchrun_command(config: str, overrides: Sequence[str] = (), *, nproc_per_node: int, nnodes: int = 1,
                     node_rank: int = 0, master_addr: str | None = None, master_port: int = 29500,
                     python: str | None = None) -> list[str]:
    """argv of `python -m torch.distributed.run ... -m ddistill.engine CONFIG overrides...`.

    One node: `--standalone` (a free local port, no clash with other jobs). Several nodes: a static rendezvous
    at master_addr:master_port, run once per node with its node_rank.
    """
    if nproc_per_node < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"nproc_per_node={nproc_per_node}, nnodes={nnodes}, node_rank={node_rank} are inconsistent")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        if not master_addr:
            raise ValueError("a multi-node torchrun needs master_addr (the address of node 0)")
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    cmd += [f"--nproc_per_node={nproc_per_node}", "-m", "ddistill.engine", str(config), *overrides]
    return cmd


def run_torchrun(config: str, overrides: Sequence[str] = (), *, nproc_per_node: int, timeout_s: float | None = None,
                 **kwargs) -> subprocess.CompletedProcess:
    """Run the torchrun command (OMP_NUM_THREADS=1 unless set) and wait for it."""
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    return subprocess.run(torchrun_command(config, overrides, nproc_per_node=nproc_per_node, **kwargs), env=env,
                          timeout=timeout_s, check=False)
