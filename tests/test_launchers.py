"""Launchers: command lines (torchrun, deepspeed + hostfile, srun), submitit parameters / sbatch script, the
preemption hand-off to submitit, and a real 2-task run through submitit's LocalExecutor (gloo on CPU)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from unittest import mock

import pytest

from ddistill.launchers import (
    SlurmConfig,
    TrainJob,
    deepspeed_command,
    hostfile_from_slurm,
    hostfile_text,
    parse_hostfile,
    parse_time,
    prepare_job,
    sbatch_script,
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


@pytest.mark.parametrize("text, minutes", [
    ("90", 90), (45, 45), ("1:30", 2), ("0:59", 1), ("1:30:00", 90), ("2-00", 2880), ("1-12:30", 2190),
    ("1-00:00:01", 1441), ("3-00:00:00", 4320),
])
def test_parse_time_table(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "0", "0:00"])
def test_parse_time_refuses(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_sbatch_script_is_the_one_submitit_writes(tmp_path):
    """Our text (used by --dry-run, no SLURM needed) equals what submitit's SlurmExecutor itself generates."""
    import submitit

    cfg = SlurmConfig(folder=str(tmp_path / "job"), nodes=2, gpus_per_node=8, partition="gpu", account="proj",
                      qos="high", constraint="h100", exclusive=True, mem="200G", timeout_min=600, signal_delay_s=240,
                      setup=["module load cuda"], additional={"comment": "x"})
    params = slurm_parameters(cfg)
    assert params["ntasks_per_node"] == params["gpus_per_node"] == 8 and cfg.world_size == 16
    text = sbatch_script(cfg)
    with mock.patch("shutil.which", return_value="/usr/bin/srun"):
        executor = submitit.SlurmExecutor(folder=cfg.folder)
        executor.update_parameters(**params)
        assert text == executor._make_submission_file_text(executor._submitit_command_str, "uid")
    lines = text.splitlines()
    for expected in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                     "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                     "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --mem=200G", "#SBATCH --time=600",
                     "#SBATCH --signal=USR2@240", "#SBATCH --requeue", "#SBATCH --comment=x",
                     f"#SBATCH --chdir={tmp_path / 'job'}", "module load cuda", "export OMP_NUM_THREADS=8",
                     f"export PYTHONPATH={tmp_path / 'job' / 'code'}${{PYTHONPATH:+:$PYTHONPATH}}"]:
        assert expected in lines, (expected, text)
    srun = next(line for line in lines if line.startswith("srun"))
    assert "--cpu-bind=none" in srun and "--open-mode=append" in srun and f"_submit {tmp_path / 'job'}" in srun
    cpu = sbatch_script(SlurmConfig(folder=str(tmp_path / "cpu"), gpus_per_node=0, tasks_per_node=4,
                                    cpus_per_task=2, timeout_min=60, signal_delay_s=120))
    assert "#SBATCH --ntasks-per-node=4" in cpu and "gpus-per-node" not in cpu


def test_slurm_config_refuses_inconsistent_requests(tmp_path):
    folder = str(tmp_path)
    with pytest.raises(ValueError, match="signal_delay_s"):
        SlurmConfig(folder=folder, timeout_min=5, signal_delay_s=300)
    with pytest.raises(ValueError, match="tasks_per_node"):
        SlurmConfig(folder=folder, gpus_per_node=0)
    with pytest.raises(ValueError, match="one rank per GPU"):
        SlurmConfig(folder=folder, gpus_per_node=8, tasks_per_node=4)
    with pytest.raises(ValueError, match="nodes"):
        SlurmConfig(folder=folder, nodes=0)


def _run_cfg(tmp_path, *overrides):
    from ddistill.engine import load_run_config

    return load_run_config(ROOT / "configs/experiments/classics_mdlm_test.yaml",
                           [f"train.out_dir={tmp_path / 'out'}", *overrides])


def test_prepare_job_checks_the_world_size_and_the_devices_before_anything_is_written(tmp_path):
    from ddistill.config import ConfigError

    slurm = SlurmConfig(folder=str(tmp_path / "job"), nodes=3, gpus_per_node=2)  # 6 ranks
    with pytest.raises(ConfigError, match=r"global_batch_size=8 .* world size 6 \(3 nodes x 2 tasks per node\)"):
        prepare_job(_run_cfg(tmp_path), slurm, source={})
    with pytest.raises(ConfigError, match="train.device=cpu with --gpus-per-node 2"):
        prepare_job(_run_cfg(tmp_path, "train.device=cpu", "train.global_batch_size=24"), slurm, source={})
    cpu = SlurmConfig(folder=str(tmp_path / "job"), gpus_per_node=0, tasks_per_node=2)
    with pytest.raises(ConfigError, match="train.device=cuda but --gpus-per-node 0"):
        prepare_job(_run_cfg(tmp_path, "train.device=cuda"), cpu, source={})
    assert not (tmp_path / "job").exists()
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "something").write_text("x")
    with pytest.raises(ValueError, match="already holds files"):
        prepare_job(_run_cfg(tmp_path, "train.device=cpu"), cpu, source={})


def test_job_folder_holds_the_resolved_config_and_a_frozen_copy_of_the_code(tmp_path, monkeypatch):
    from ddistill.engine import load_run_config
    from ddistill.launchers.slurm import write_job_folder

    monkeypatch.chdir(tmp_path)
    cfg = _run_cfg(tmp_path, "train.device=cpu", "train.max_steps=7", "train.out_dir=relative/out")
    job = prepare_job(cfg, SlurmConfig(folder="jobs/a", gpus_per_node=0, tasks_per_node=2), source={"config": "c"})
    write_job_folder(job)
    folder = tmp_path / "jobs/a"
    resolved = load_run_config(folder / "config.yaml")
    assert resolved.to_dict() == job.run_config.to_dict() and resolved.train.max_steps == 7
    assert resolved.train.out_dir == str(tmp_path / "relative/out")  # tasks run in the job folder
    package = ROOT / "ddistill"
    copied = sorted(p.relative_to(folder / "code/ddistill") for p in (folder / "code/ddistill").rglob("*.py"))
    assert copied == sorted(p.relative_to(package) for p in package.rglob("*.py"))
    assert (folder / "code/ddistill/launchers/slurm.py").read_bytes() == (package / "launchers/slurm.py").read_bytes()
    meta = json.loads((folder / "submit.json").read_text())
    assert meta["world_size"] == 2 and meta["job_ids"] == [] and meta["task_command"].endswith("jobs/a/config.yaml")


def _cli(capsys, *args) -> tuple[int, str, str]:
    """Run `ddistill ARGS` in this process: (exit code, stdout, stderr)."""
    from ddistill.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as stop:
        code = stop.code if stop.code is not None else 0
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, err: str) -> str:
    """The bad-input exit code, no traceback, and the message as the last line of stderr."""
    from ddistill.exit_codes import ExitCode

    assert code == ExitCode.BAD_INPUT and "Traceback" not in err, (code, err)
    return err.strip().splitlines()[-1]


def test_submit_without_slurm_refuses_in_one_line_unless_local_is_asked(tmp_path, monkeypatch, capsys):
    config = str(ROOT / "configs/experiments/classics_mdlm_test.yaml")
    real_which = shutil.which
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None if name == "srun" else real_which(name, *a, **k))
    common = [config, "train.device=cpu", "--launcher", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "2"]
    code, out, err = _cli(capsys, "submit", *common, "--job-dir", str(tmp_path / "job"))
    line = _one_line_error(code, err)
    assert line.startswith("ddistill submit:") and "srun is not on the PATH" in line and "--cluster local" in line
    assert not (tmp_path / "job").exists() and "submitted job" not in out  # nothing written, nothing started
    code, out, _ = _cli(capsys, "submit", *common, "--job-dir", str(tmp_path / "job"), "--dry-run")
    assert code == 0  # a dry run needs no SLURM
    assert out.startswith("#!/bin/bash") and f"ddistill train {tmp_path / 'job'}/config.yaml" in out
    assert "#SBATCH --ntasks-per-node=2" in out and not (tmp_path / "job").exists()
    line = _one_line_error(*_cli(capsys, "submit", *common, "train.global_batch_size=12", "--dry-run")[::2])
    assert "global_batch_size=12" in line and "world size 2" in line
    code, out, _ = _cli(capsys, "submit", "--help")
    helptext = " ".join(out.split())
    assert code == 0 and "(default: 3-00:00:00)" in helptext and "(default: slurm)" in helptext


def test_deepspeed_and_torchrun_submissions_check_the_world_size(tmp_path, capsys):
    config = str(ROOT / "configs/experiments/classics_mdlm_test.yaml")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text(["a", "b", "c"], 1))
    code, _, err = _cli(capsys, "submit", config, "--launcher", "deepspeed", "--hostfile", str(hostfile),
                        "--master-addr", "a", "--dry-run")
    line = _one_line_error(code, err)
    assert "world size 3" in line and "hostfile" in line
    code, _, err = _cli(capsys, "submit", config, "--launcher", "torchrun", "--gpus-per-node", "3", "--dry-run")
    assert "world size 3 (1 nodes x 3 GPUs)" in _one_line_error(code, err)
    code, out, _ = _cli(capsys, "submit", config, "--launcher", "torchrun", "--gpus-per-node", "2", "--dry-run")
    assert code == 0 and "--nproc_per_node=2" in out


@pytest.mark.parametrize("result, state", [
    (None, "ENDED"),
    (("success", {"stop_reason": "max_steps", "step": 9}), "FINISHED"),
    (("success", {"stop_reason": "preempted", "step": 4}), "PREEMPTED"),
    (("success", {"stop_reason": "nonfinite", "step": 4}), "STOPPED"),
    (("error", "Traceback ...\nRuntimeError: boom\n"), "FAILED"),
])
def test_final_state_table(result, state):
    from ddistill.launchers.jobs import final_state

    got, detail = final_state(result)
    assert got == state
    if state == "FAILED":
        assert detail == "RuntimeError: boom"


def test_jobs_lists_state_step_and_last_loss(tmp_path, monkeypatch):
    import pickle

    from ddistill.launchers import format_jobs, list_jobs

    monkeypatch.setattr("shutil.which", lambda name: None)  # no squeue: states from the result files
    for name, job_id, result, losses in [("a", "11", ("success", {"stop_reason": "max_steps"}), [3.5, 3.25]),
                                         ("b", "12", None, [4.0])]:
        job = tmp_path / name
        job.mkdir()
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                   for i, v in enumerate(losses)) + json.dumps({"step": 9}) + "\n")
        (job / "submit.json").write_text(json.dumps({"job_ids": [job_id], "out_dir": str(out),
                                                     "created": f"2026-01-0{len(name)}T00:00:0{job_id[-1]}"}))
        if result is not None:
            (job / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(result))
    rows = list_jobs(tmp_path)
    assert [(r["job_id"], r["state"], r["step"], r["loss"]) for r in rows] == [("11", "FINISHED", 2, 3.25),
                                                                               ("12", "ENDED", 1, 4.0)]
    table = format_jobs(rows).splitlines()
    assert table[0].split()[:5] == ["job", "id", "state", "step", "loss"] and table[1].split()[:5] == [
        "a", "11", "FINISHED", "2", "3.2500"]
    assert list_jobs(tmp_path / "a")[0]["job_id"] == "11"  # a single job folder works too
    with pytest.raises(FileNotFoundError):
        list_jobs(tmp_path / "missing")


def test_hostfile_from_slurm_needs_an_allocation(monkeypatch):
    monkeypatch.setattr("ddistill.launchers.multinode.slurm_hostnames", lambda nodelist: ["n1", "n2"])
    assert hostfile_from_slurm({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4"}) == (
        "n1 slots=4\nn2 slots=4\n")
    assert hostfile_from_slurm({"SLURM_JOB_NODELIST": "n[1-2]"}, slots=2) == "n1 slots=2\nn2 slots=2\n"
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        hostfile_from_slurm({})
    with pytest.raises(ValueError, match="SLURM_GPUS_ON_NODE"):
        hostfile_from_slurm({"SLURM_JOB_NODELIST": "n1"})


def test_checkpoint_is_a_fresh_job_with_the_original_arguments():
    job = TrainJob("cfg.yaml", ["a=1"])
    job.some_state = "must not travel"
    delayed = job.checkpoint()
    fresh = delayed.function
    assert isinstance(fresh, TrainJob) and fresh is not job
    assert (fresh.config, fresh.overrides) == ("cfg.yaml", ["a=1"]) and not hasattr(fresh, "some_state")


@pytest.mark.parametrize("rank, sig, handed", [("0", "SIGUSR2", True), ("1", "SIGUSR2", False),
                                               ("0", "SIGTERM", False), ("0", None, False)])
def test_only_rank0_hands_a_time_limit_signal_to_submitit(monkeypatch, rank, sig, handed):
    """USR2 (time limit): rank 0 lets submitit requeue. SIGTERM (scontrol requeue, scancel): SLURM decides."""
    from ddistill.engine import trainer as trainer_module

    calls = []

    class FakeJob(TrainJob):
        def run(self, cfg):
            return {"preempted": sig is not None, "preempt_signal": sig}

    task_rank = int(rank)

    class FakeEnv:
        rank, world_size, master_addr, master_port = task_rank, 2, "n1", 1

        def export(self, **kwargs):
            return self

    monkeypatch.setitem(trainer_module.PREVIOUS_HANDLERS, signal.SIGUSR2, lambda s, f: calls.append(s))
    monkeypatch.setattr("submitit.helpers.TorchDistributedEnvironment", FakeEnv)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr("ddistill.engine.load_run_config", lambda path, overrides: None)
    FakeJob("cfg.yaml")()
    assert calls == ([signal.SIGUSR2] if handed else [])


@pytest.mark.parametrize("ran_min, countdown, outcome", [
    (1, 3, ("requeued", 3)),  # a signal long before the limit (a preemption): the count is not touched
    (50, 3, ("requeued", 2)),  # past min(0.8 T, T - 10 min) of the limit T = 60 min: a time-out, counted
    (50, 0, ("ended", "timed-out too many times")),  # no time-outs left: the job ends instead of requeueing
])
def test_time_limit_requeues_are_bounded_and_preemptions_are_not(tmp_path, monkeypatch, ran_min, countdown,
                                                                  outcome):
    """submitit's handler, to which rank 0 hands USR2, with our TrainJob as the pickled job (SLURM environment)."""
    import time as time_module

    from submitit.core.job_environment import SignalHandler
    from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError
    from submitit.slurm.slurm import SlurmJobEnvironment

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    delayed = DelayedSubmission(TrainJob(str(tmp_path / "config.yaml")))
    delayed.set_timeout(60, countdown)
    paths = JobPaths(tmp_path, job_id="77")
    paths.folder.mkdir(parents=True, exist_ok=True)
    requeued = []
    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", lambda self, left: requeued.append(left))
    handler = SignalHandler(SlurmJobEnvironment(), paths, delayed)
    handler._start_time = time_module.time() - ran_min * 60
    try:
        handler.checkpoint_and_try_requeue(signal.SIGUSR2)
        result = None
    except SystemExit:
        result = ("requeued", requeued[0])
        fresh = DelayedSubmission.load(paths.submitted_pickle)  # what the requeued job will run: a fresh TrainJob
        assert isinstance(fresh.function, TrainJob) and fresh._timeout_countdown == requeued[0]
    except UncompletedJobError as err:
        result = ("ended", "timed-out too many times" if "timed-out too many times" in str(err) else str(err))
    assert result == outcome


@pytest.mark.slow
def test_submit_with_the_local_executor_runs_two_gloo_ranks(tmp_path, monkeypatch):
    """`ddistill submit --cluster local`'s path: the job folder, then two real processes through submitit."""
    from ddistill.launchers import submit_job

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    cfg = _run_cfg(tmp_path, "train.device=cpu", "model.length=16", "data.block_size=16", "train.max_steps=4",
                   "train.global_batch_size=8", "train.micro_batch_size=2", "train.ckpt_every=2",
                   "train.eval_every=0", "deepspeed.timeout_minutes=2", "logging.progress_bar=false")
    slurm = SlurmConfig(folder=str(tmp_path / "job"), gpus_per_node=0, tasks_per_node=2, timeout_min=5,
                        signal_delay_s=60)
    job = submit_job(prepare_job(cfg, slurm, source={"config": "classics_mdlm_test.yaml"}), cluster="local")
    results = job.results()
    assert [r["world_size"] for r in results] == [2, 2]
    assert all(r["step"] == 4 and r["grad_accum"] == 2 for r in results)
    assert (tmp_path / "out/checkpoints/step_00000004/MANIFEST.json").is_file()
    assert json.loads((tmp_path / "job/submit.json").read_text())["job_ids"] == [str(job.job_id)]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
