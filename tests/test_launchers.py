"""Launchers: command lines (torchrun, deepspeed + hostfile, srun), submitit parameters / sbatch script, the
preemption hand-off to submitit, and a real 2-task run through submitit's LocalExecutor (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from ddistill.launchers import (
    SlurmConfig,
    TrainJob,
    deepspeed_command,
    hostfile_text,
    parse_hostfile,
    slurm_parameters,
    srun_deepspeed_command,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_single_and_multi_node():
    cmd = torchrun_command("c.yaml", ["train.max_steps=5"], nproc_per_node=2, python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                   "ddistill.engine", "c.yaml", "train.max_steps=5"]
    cmd = torchrun_command("c.yaml", nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                           master_port=1234, python="py")
    assert "--standalone" not in cmd
    assert cmd[3:7] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=1234"]
    with pytest.raises(ValueError, match="master_addr"):
        torchrun_command("c.yaml", nproc_per_node=8, nnodes=2, node_rank=0)
    with pytest.raises(ValueError):
        torchrun_command("c.yaml", nproc_per_node=8, nnodes=2, node_rank=2, master_addr="a")


def test_hostfile_roundtrip_and_errors():
    text = hostfile_text(["gpu01", "gpu02"], 8)
    assert text == "gpu01 slots=8\ngpu02 slots=8\n"
    assert parse_hostfile("# cluster\n" + text + "\n") == {"gpu01": 8, "gpu02": 8}
    with pytest.raises(ValueError, match="twice"):
        parse_hostfile("a slots=1\na slots=2\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_hostfile("a slots=x\n")
    with pytest.raises(ValueError, match="duplicate"):
        hostfile_text(["a", "a"], 1)


def test_deepspeed_command_with_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text(["n0", "n1"], 4))
    cmd = deepspeed_command("cfg.yaml", ["train.seed=3"], hostfile=hostfile, master_addr="n0", master_port=29600)
    assert cmd == ["deepspeed", f"--hostfile={hostfile}", "--master_addr=n0", "--master_port=29600", "--module",
                   "ddistill.engine", "cfg.yaml", "train.seed=3"]
    cmd = deepspeed_command("cfg.yaml", hostfile=hostfile, master_addr="n0", no_ssh=True, node_rank=1,
                            include="n0:0,1@n1:0,1", launcher_env={"NCCL_DEBUG": "WARN"})
    assert cmd[:2] == ["env", "NCCL_DEBUG=WARN"]
    assert "--no_ssh" in cmd and "--node_rank=1" in cmd and "--include=n0:0,1@n1:0,1" in cmd
    with pytest.raises(FileNotFoundError):  # deepspeed itself would silently fall back to one node
        deepspeed_command("cfg.yaml", hostfile=tmp_path / "missing", master_addr="n0")
    with pytest.raises(ValueError, match="node_rank"):
        deepspeed_command("cfg.yaml", hostfile=hostfile, master_addr="n0", no_ssh=True)
    line = srun_deepspeed_command("cfg.yaml", hostfile=hostfile, master_addr="n0")
    outer = shlex.split(line)
    assert outer[:4] == ["srun", "--ntasks-per-node=1", "bash", "-c"]
    inner = shlex.split(outer[4])
    assert "--node_rank=$SLURM_NODEID" in inner and "--no_ssh" in inner  # expanded on each node by bash -c


def test_train_main_ignores_deepspeed_local_rank_argument():
    from ddistill.config import ConfigError
    from ddistill.engine import train_main

    with pytest.raises(ConfigError, match="nonexistent"):
        train_main(["nonexistent.yaml", "--local_rank=3"])


def test_slurm_parameters_and_generated_sbatch_script(tmp_path):
    import submitit

    cfg = SlurmConfig(folder=str(tmp_path), nodes=2, gpus_per_node=8, partition="gpu", account="proj",
                      timeout_min=600, signal_delay_s=240, setup=["module load cuda"], additional={"requeue": True})
    params = slurm_parameters(cfg)
    assert params["tasks_per_node"] == params["gpus_per_node"] == 8
    with mock.patch("shutil.which", return_value="/usr/bin/srun"):
        executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
        executor.update_parameters(**params)
        text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit X", "uid")
    lines = text.splitlines()
    for expected in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=600",
                     "#SBATCH --signal=USR2@240", "#SBATCH --requeue", "module load cuda",
                     "export OMP_NUM_THREADS=1"]:
        assert expected in lines, (expected, text)
    srun = next(line for line in lines if line.startswith("srun"))
    assert "--cpu-bind=none" in srun


def test_signal_delay_must_fit_the_time_limit(tmp_path):
    with pytest.raises(ValueError, match="signal_delay_s"):
        SlurmConfig(folder=str(tmp_path), timeout_min=5, signal_delay_s=300)


def test_submitit_checkpoint_is_a_fresh_job_with_the_original_arguments():
    job = TrainJob("cfg.yaml", ["a=1"])
    job.some_state = "must not travel"
    delayed = job.__submitit_checkpoint__()
    fresh = delayed.function
    assert isinstance(fresh, TrainJob) and fresh is not job
    assert (fresh.config, fresh.overrides) == ("cfg.yaml", ["a=1"]) and not hasattr(fresh, "some_state")


def test_preempted_rank0_hands_the_signal_to_submitit(monkeypatch, tmp_path):
    from ddistill.engine import trainer as trainer_module

    calls = []

    class FakeJob(TrainJob):
        def run(self, cfg):
            return {"preempted": True}

    monkeypatch.setitem(trainer_module.PREVIOUS_HANDLERS, signal.SIGUSR2, lambda s, f: calls.append(s))
    monkeypatch.setattr("submitit.helpers.TorchDistributedEnvironment.export", lambda self, **kw: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("ddistill.engine.load_run_config", lambda path, overrides: None)
    with mock.patch("submitit.helpers.TorchDistributedEnvironment.__init__", return_value=None):
        FakeJob("cfg.yaml").__call__()
    assert calls == [signal.SIGUSR2]
    monkeypatch.setenv("RANK", "1")
    with mock.patch("submitit.helpers.TorchDistributedEnvironment.__init__", return_value=None):
        FakeJob("cfg.yaml").__call__()
    assert calls == [signal.SIGUSR2]  # other ranks never requeue


class ArrayJob(TrainJob):
    """Trains on random token blocks (no tokenizer / corpus assets needed in CI)."""

    def run(self, cfg):
        from ddistill.engine import run_training

        blocks = np.random.default_rng(0).integers(0, 36, size=(64, 16)).astype(np.int32)
        return run_training(cfg, train_blocks=blocks)


@pytest.mark.slow
def test_local_executor_runs_two_gloo_ranks(tmp_path, monkeypatch):
    from ddistill.launchers.slurm import make_executor

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({
        "model": {"size": "test", "vocab_size": 37}, "data": {"block_size": 16},
        "method": {"name": "mdlm"},
        "train": {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2, "ckpt_every": 2,
                  "out_dir": str(tmp_path / "out"), "device": "cpu"},
        "deepspeed": {"timeout_minutes": 2}, "logging": {"wandb": "disabled", "progress_bar": False}}))
    executor = make_executor(SlurmConfig(folder=str(tmp_path / "submitit"), gpus_per_node=2, timeout_min=5,
                                         signal_delay_s=60), cluster="local")
    job = executor.submit(ArrayJob(str(config)))
    results = job.results()
    assert [r["world_size"] for r in results] == [2, 2]
    assert all(r["step"] == 4 and r["grad_accum"] == 2 for r in results)
    assert (tmp_path / "out/checkpoints/step_00000004/MANIFEST.json").is_file()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
