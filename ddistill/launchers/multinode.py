"""The DeepSpeed launcher on several nodes: hostfile + `deepspeed` command lines.

Hostfile format: one `<host> slots=<gpus>` line per node (`#` comments allowed). Two ways to start:

* over ssh (pdsh): run `deepspeed --hostfile H --master_addr A --master_port P --module ddistill.engine CONFIG ...`
  once, on the first node; it starts one launcher per node.
* without ssh (e.g. inside a SLURM allocation): `srun --ntasks-per-node=1 deepspeed --hostfile H --no_ssh
  --node_rank=$SLURM_NODEID --master_addr A --master_port P --module ddistill.engine ...` (one launcher per node).

The launcher appends `--local_rank=N` to our argv; `ddistill.engine.train_main` ignores it. Note that the DeepSpeed
launcher only warns and runs single-node when the hostfile is missing, so we check that it exists.

Inside an allocation the hostfile comes from SLURM's own expansion of the nodelist (`scontrol show hostnames`):

    python -m ddistill.launchers.multinode hostfile --slots 8 > hostfile   # in the sbatch script, before srun

Rendezvous and collectives time out after `deepspeed.timeout_minutes` (run config); on hosts with several
interfaces pin the one to use with `launcher_env={"GLOO_SOCKET_IFNAME": ..., "NCCL_SOCKET_IFNAME": ...}`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["hostfile_text", "parse_hostfile", "slurm_hostnames", "hostfile_from_slurm", "deepspeed_command",
           "srun_deepspeed_command"]

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    if not hosts:
        raise ValueError("hostfile needs at least one host")
    if slots < 1:
        raise ValueError(f"slots={slots} must be >= 1")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"duplicate hosts in {list(hosts)}")
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def parse_hostfile(text: str) -> dict[str, int]:
    """{host: slots} in file order; the same rules as DeepSpeed's parser (duplicates and bad lines are errors)."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"hostfile line {number}: {raw!r} is not '<host> slots=<n>'")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise ValueError(f"hostfile line {number}: host {host!r} appears twice")
        hosts[host] = slots
    if not hosts:
        raise ValueError("hostfile lists no hosts")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST`: SLURM's expansion of a nodelist such as `gpu[01-03,7],login-a`."""
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ValueError(f"scontrol show hostnames {nodelist!r} failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def hostfile_from_slurm(environ: Mapping[str, str], *, slots: int | None = None) -> str:
    """Hostfile text of the current allocation: its nodes in SLURM order, `slots` each (default: the GPUs SLURM
    gave this node, SLURM_GPUS_ON_NODE)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation (sbatch / salloc)")
    if slots is None:
        if "SLURM_GPUS_ON_NODE" not in environ:
            raise ValueError("SLURM_GPUS_ON_NODE is not set (no GPUs allocated?); pass the slots per node")
        slots = int(environ["SLURM_GPUS_ON_NODE"])
    return hostfile_text(slurm_hostnames(nodelist), slots)


def deepspeed_command(config: str, overrides: Sequence[str] = (), *, hostfile: str | Path, master_addr: str,
                      master_port: int = 29500, no_ssh: bool = False, node_rank: int | str | None = None,
                      include: str | None = None, check_hostfile: bool = True,
                      launcher_env: Mapping[str, str] | None = None) -> list[str]:
    """argv of the `deepspeed` runner starting `-m ddistill.engine CONFIG overrides...` on the hostfile's nodes."""
    hostfile = Path(hostfile)
    if check_hostfile:
        parse_hostfile(hostfile.read_text())  # a missing hostfile silently means "single node" to deepspeed
    if no_ssh and node_rank is None:
        raise ValueError("no_ssh=True needs node_rank (e.g. '$SLURM_NODEID')")
    cmd = [f"{k}={v}" for k, v in (launcher_env or {}).items()]
    cmd = (["env", *cmd] if cmd else []) + ["deepspeed", f"--hostfile={hostfile}", f"--master_addr={master_addr}",
                                            f"--master_port={master_port}"]
    if include:
        cmd.append(f"--include={include}")
    if no_ssh:
        cmd += ["--no_ssh", f"--node_rank={node_rank}"]
    cmd += ["--module", "ddistill.engine", str(config), *overrides]
    return cmd


def srun_deepspeed_command(config: str, overrides: Sequence[str] = (), *, hostfile: str | Path, master_addr: str,
                           master_port: int = 29500, check_hostfile: bool = True) -> str:
    """Shell line for an sbatch script: one ssh-less DeepSpeed launcher per node of the allocation."""
    inner = deepspeed_command(config, overrides, hostfile=hostfile, master_addr=master_addr, master_port=master_port,
                              no_ssh=True, node_rank="NODE_RANK_PLACEHOLDER", check_hostfile=check_hostfile)
    quoted = " ".join(shlex.quote(a) for a in inner).replace("NODE_RANK_PLACEHOLDER", "$SLURM_NODEID")
    return f"srun --ntasks-per-node=1 bash -c {shlex.quote(quoted)}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddistill.launchers.multinode",
                                     description="Print the DeepSpeed hostfile of the current SLURM allocation.")
    parser.add_argument("what", choices=("hostfile",))
    parser.add_argument("--slots", type=int, default=None, help="ranks per node (default: SLURM_GPUS_ON_NODE)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(hostfile_from_slurm(os.environ, slots=args.slots))
    except ValueError as err:
        raise SystemExit(f"ddistill hostfile: {err}") from None


if __name__ == "__main__":
    main()
