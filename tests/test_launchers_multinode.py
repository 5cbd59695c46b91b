"""Multi-node `deepspeed --no_ssh` for real: two simulated hosts on one machine.

Two network namespaces, each with its own address on one veth pair (10.213.7.1 and 10.213.7.2, reachable only
from inside the namespaces; the test creates and removes them), hold one rank each. Host 0 runs the argv of
`deepspeed_command(..., no_ssh=True, node_rank=0)`; host 1 runs the shell line `srun_deepspeed_command` puts in an
sbatch script, as srun would start it on node 1 (SLURM_NODEID=1). They train SDTT (ZeRO-2 student, ZeRO-3 teacher
partitioned over the two hosts) over gloo; the result must equal, bit for bit, the same run as two ranks of
`torchrun --standalone` on one host.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddistill.launchers import deepspeed_command, hostfile_text, srun_deepspeed_command
from local_slurm import SlurmUnavailable, apt_install

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = str(ROOT / "configs/experiments/sdtt_classics_tiny.yaml")
SUBNET = "10.213.7"
MAX_STEPS = 4

pytestmark = pytest.mark.slow


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def two_hosts():
    """[(namespace, interface, address)] for host 0 and host 1, joined by a veth pair; removed afterwards."""
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"ddh0-{tag}", f"ddv0-{tag}", f"{SUBNET}.1"), (f"ddh1-{tag}", f"ddv1-{tag}", f"{SUBNET}.2")]
    try:
        apt_install(["iproute2"], ["ip"])  # a fresh CI machine may lack `ip`
        for ns, _, _ in hosts:
            _ip("netns", "add", ns)
    except (RuntimeError, FileNotFoundError, SlurmUnavailable) as err:
        for ns, _, _ in hosts:
            _ip("netns", "del", ns, check=False)
        if os.geteuid() == 0:
            raise  # CI runs as root: namespaces must work
        pytest.skip(f"cannot create network namespaces: {err}")
    try:
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, addr in hosts:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns, check=False)


def _teacher(tmp_path) -> Path:
    from ddistill.models import ModelConfig, build_model, save_pretrained

    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", length=16, dropout=0.0, time_conditioning=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return save_pretrained(model, tmp_path / "teacher", flavor="mdlm")


def _overrides(tmp_path, out_dir: Path) -> list[str]:
    return ["model.size=test", "model.length=16", "model.dropout=0.0", "data.block_size=16",
            "train.device=cpu", "method.initial_teacher_steps=16", "method.num_rounds=2", "method.steps_per_round=2",
            f"train.max_steps={MAX_STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.log_every=1", "train.ckpt_every=100", "train.eval_every=0", "train.export_final=false",
            "optim.warmup_steps=0", "deepspeed.trained_zero_stage=2", "deepspeed.frozen_zero_stage=3",
            "deepspeed.frozen_persistence_threshold=0", "deepspeed.timeout_minutes=2", "logging.wandb=disabled",
            "logging.progress_bar=false", f"init_from={_teacher(tmp_path)}", f"train.out_dir={out_dir}"]


def _env(tmp_path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID"):
        env.pop(key, None)
    return env


def _result(out_dir: Path):
    from ddistill.engine.checkpoint import list_checkpoints, verify_checkpoint

    step, path = list_checkpoints(out_dir / "checkpoints")[-1]
    verify_checkpoint(path)
    raw = torch.load(path / "ds/student/state/mp_rank_00_model_states.pt", map_location="cpu",
                     weights_only=False)["module"]
    teacher = torch.load(path / "frozen/teacher.pt", map_location="cpu")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return step, raw, teacher, {r["step"]: r["loss/student"] for r in records}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_namespace_hosts_equal_one_host(two_hosts, tmp_path):
    env = _env(tmp_path)
    one = tmp_path / "one_host"
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "ddistill.engine", CONFIG, *_overrides(tmp_path, one)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    two = tmp_path / "two_hosts"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text(["host0", "host1"], 1))
    (ns0, dev0, master), (ns1, dev1, _) = two_hosts
    port = 29731
    overrides = _overrides(tmp_path, two)
    head = deepspeed_command(CONFIG, overrides, hostfile=hostfile, master_addr=master, master_port=port,
                             no_ssh=True, node_rank=0, launcher_env={"GLOO_SOCKET_IFNAME": dev0})
    # What srun runs on node 1: the sbatch line without its `srun --ntasks-per-node=1` prefix.
    line = srun_deepspeed_command(CONFIG, overrides, hostfile=hostfile, master_addr=master, master_port=port)
    srun_prefix, node_cmd = line.split(" bash -c ", 1)
    assert srun_prefix == "srun --ntasks-per-node=1"
    procs = [
        subprocess.Popen(["ip", "netns", "exec", ns0, *head], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
        subprocess.Popen(["ip", "netns", "exec", ns1, "bash", "-c", shlex.split(node_cmd)[0]],
                         env=dict(env, SLURM_NODEID="1", GLOO_SOCKET_IFNAME=dev1), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-3000:] for o in outputs)

    one_step, one_raw, one_teacher, one_losses = _result(one)
    two_step, two_raw, two_teacher, two_losses = _result(two)
    assert one_step == two_step == MAX_STEPS
    assert sorted(two_losses) == list(range(1, MAX_STEPS + 1)) and two_losses == one_losses
    assert _same(one_raw, two_raw)
    assert _same(one_teacher, two_teacher)  # the round-1 teacher (the student after round 0) agrees too
