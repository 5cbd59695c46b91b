"""`ddistill submit` on a real SLURM controller (tests/local_slurm.py: munge + slurmctld + slurmd on localhost,
2 CPUs as 2 tasks): a 2-task CPU job trains the classics test model; the same job interrupted by `scontrol requeue`
(SIGTERM) and then by its time limit (USR2 from `--signal`, requeued by submitit) resumes to the same weights and
losses bit for bit; `--dry-run` prints exactly the script that was submitted; `ddistill jobs` reports the states.

SLURM holds a requeued job for 120 s (BeginTime); the test releases it at once with `scontrol update
StartTime=now`, as an operator could. The time limit is brought forward with `scontrol update TimeLimit=1` while
the job trains, so that the controller's warning (`--signal=USR2@90`) is due at once; the controller sends it at its
next time-limit check (every 30 s). So that the run cannot finish first however fast the machine, both tasks are
paused (SIGSTOP) until the kernel shows USR2 pending on each, then continued: they handle it at the next step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from local_slurm import LocalSlurm, SlurmUnavailable

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CONFIG = str(ROOT / "configs/experiments/classics_mdlm_test.yaml")
MAX_STEPS = 24
RUN = ["train.device=cpu", "model.length=16", "data.block_size=16", "train.global_batch_size=4",
       "train.micro_batch_size=2", f"train.max_steps={MAX_STEPS}", "train.log_every=1", "train.eval_every=0",
       "train.ckpt_every=1000", "train.keep_last=3", "logging.progress_bar=false", "deepspeed.timeout_minutes=3"]
SLURM = ["--launcher", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1",
         "--time", "10", "--signal-delay-s", "90", "--max-timeouts", "3"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        with LocalSlurm(root) as slurm:
            yield slurm
    except SlurmUnavailable as err:
        if os.geteuid() == 0:
            raise  # CI (root, apt-get): SLURM must work
        pytest.skip(f"no local SLURM: {err}")


def _env(cluster, tmp_path) -> dict:
    env = dict(cluster.env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), DDISTILL_LOG="WARNING")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _cli(env, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "ddistill.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _submit(env, job_dir: Path, out_dir: Path, *extra) -> str:
    proc = _cli(env, "submit", CONFIG, *RUN, f"train.out_dir={out_dir}", *SLURM, "--job-dir", str(job_dir), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((job_dir / "submit.json").read_text())
    assert f"submitted job {meta['job_ids'][-1]}" in proc.stdout
    return meta["job_ids"][-1]


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait(what: str, ready, cluster, job_dir: Path, timeout=240.0, poll=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(poll)
    logs = "".join(f"\n--- {p.name} ---\n{p.read_text()[-2500:]}" for p in sorted(job_dir.glob("*_log.*")))
    raise AssertionError(f"timed out waiting for {what}{logs}\n{cluster.logs()}")


def _release_when_requeued(cluster, job_id, job_dir, *updates):
    """Wait for the requeued job to be PENDING again, apply `updates`, and start it without SLURM's 120 s hold."""
    _wait(f"job {job_id} pending after requeue", lambda: cluster.job_state(job_id) == "PENDING", cluster, job_dir,
          timeout=120)
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now", *updates)


def _task_pids(job_dir: Path, job_id: str, *, restart: int) -> list[int]:
    """The pids of both ranks' processes in attempt `restart` of the job (from their banner lines)."""
    pids = []
    for rank in (0, 1):
        lines = [line for line in (job_dir / f"{job_id}_{rank}_log.out").read_text().splitlines()
                 if line.startswith(f"ddistill task rank {rank}/2 ") and line.endswith(f"restart {restart}")]
        assert len(lines) == 1, lines
        pids.append(int(lines[0].split(" pid ")[1].split()[0]))
    return pids


def _run_time_s(cluster, job_id: str) -> int:
    field = next(f for f in cluster.scontrol("show", "job", job_id).split() if f.startswith("RunTime="))
    days, _, clock = field.removeprefix("RunTime=").rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def _usr2_pending(pid: int) -> bool:
    status = _status(pid)
    mask = int(status.get("ShdPnd", "0"), 16) | int(status.get("SigPnd", "0"), 16)
    return bool(mask & (1 << (signal.SIGUSR2 - 1)))


def _stopped(pid: int) -> bool:
    return _status(pid).get("State", "").startswith("T")


def _final(out_dir: Path):
    """Raw student weights, EMA and per-step losses of a finished run."""
    from ddistill.engine.checkpoint import list_checkpoints, verify_checkpoint

    step, path = list_checkpoints(out_dir / "checkpoints")[-1]
    verify_checkpoint(path)
    raw = torch.load(path / "ds/student/state/mp_rank_00_model_states.pt", map_location="cpu",
                     weights_only=False)["module"]
    ema = torch.load(path / "ema/student.pt", map_location="cpu")["shadow"]
    losses = {r["step"]: r["loss/student"] for r in _records(out_dir) if "loss/student" in r}
    return step, raw, ema, losses


def _jobs(env, folder) -> dict:
    proc = _cli(env, "jobs", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 1, rows
    return rows[0]


def test_submit_requeue_and_time_limit_resume_exactly(cluster, tmp_path):
    env = _env(cluster, tmp_path)
    # 1. Uninterrupted: submit, time to the first training step, finish.
    ref_job, ref_out = tmp_path / "jobs_ref" / "job", tmp_path / "ref"
    start = time.time()
    ref_id = _submit(env, ref_job, ref_out)
    first_step = _wait("first training step", lambda: _records(ref_out), cluster, ref_job, poll=0.05)[0]["time"]
    print(f"\nsubmit -> first training step on the local SLURM: {first_step - start:.1f} s")
    _wait("uninterrupted job to finish", lambda: cluster.job_state(ref_id) == "GONE", cluster, ref_job, timeout=300)
    ref_row = _jobs(env, ref_job.parent)
    assert ref_row["state"] == "FINISHED" and ref_row["step"] == MAX_STEPS, ref_row
    logs = [ref_job / f"{ref_id}_{rank}_log.out" for rank in (0, 1)]
    for rank, log in enumerate(logs):  # one log per rank; every task ran the frozen copy of the code
        assert f"ddistill task rank {rank}/2" in log.read_text() and f"code {ref_job}/code/ddistill" in log.read_text()

    # 2. The same run, interrupted twice; first check that --dry-run prints what is then submitted.
    job, out = tmp_path / "jobs_int" / "job", tmp_path / "int"
    dry = _cli(env, "submit", CONFIG, *RUN, f"train.out_dir={out}", *SLURM, "--job-dir", str(job), "--dry-run")
    assert dry.returncode == 0 and not job.exists(), dry.stderr[-2000:]
    job_id = _submit(env, job, out)
    submitted = (job / f"{job_id}_submission.sh").read_text()
    assert dry.stdout.startswith(submitted) and "#SBATCH --signal=USR2@90" in submitted
    assert f"ddistill train {job}/config.yaml" in dry.stdout[len(submitted):]

    # 2a. scontrol requeue: SIGTERM to both tasks -> one checkpoint -> SLURM requeues -> resume from it.
    _wait("a few steps", lambda: len(_records(out)) >= 4, cluster, job)
    cluster.scontrol("requeue", job_id)
    _release_when_requeued(cluster, job_id, job)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].startswith("step_"), ckpts  # no .tmp left, one complete checkpoint
    first_stop = int(ckpts[0].removeprefix("step_"))
    assert 4 <= first_stop < MAX_STEPS - 6

    # 2b. Time limit: shorten it mid-run; USR2 (--signal) -> checkpoint -> rank 0 -> submitit -> scontrol requeue.
    err0 = job / f"{job_id}_0_log.err"
    resumed = f"resumed from {out}/checkpoints/step_{first_stop:08d} at step {first_stop}"
    _wait("resume after the requeue", lambda: resumed in err0.read_text(), cluster, job)
    _wait("steps after the resume", lambda: _records(out)[-1]["step"] >= first_stop + 3, cluster, job)
    pids = _task_pids(job, job_id, restart=1)
    # The new limit ends 61-120 s from now: the 90 s warning is due within 30 s, the end is not near.
    cluster.scontrol("update", f"JobId={job_id}", f"TimeLimit={_run_time_s(cluster, job_id) // 60 + 2}")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:  # slurmd sends SIGCONT with the warning signal; continue them ourselves should it not
        # SIGSTOP takes effect asynchronously: until /proc shows both stopped, "not stopped" means nothing yet.
        _wait("both tasks stopped", lambda: all(_stopped(pid) or _usr2_pending(pid) for pid in pids),
              cluster, job, timeout=30, poll=0.01)
        _wait("USR2 from the controller", lambda: all(_usr2_pending(pid) or not _stopped(pid) for pid in pids),
              cluster, job, timeout=90)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    _release_when_requeued(cluster, job_id, job, "TimeLimit=10")
    text = err0.read_text()
    assert "Caught signal SIGUSR2" in text and "timed-out" in text, text[-3000:]
    from submitit.core.utils import DelayedSubmission

    requeued = DelayedSubmission.load(job / f"{job_id}_submitted.pkl")
    assert requeued._timeout_countdown == 3 - 1  # a time-out counts against --max-timeouts
    _wait("the interrupted job to finish", lambda: cluster.job_state(job_id) == "GONE", cluster, job, timeout=300)
    row = _jobs(env, job.parent)
    assert row["state"] == "FINISHED" and row["step"] == MAX_STEPS, row
    log = (job / f"{job_id}_0_log.out").read_text()
    assert "restart 2" in log  # two requeues, one job id, one appended log per rank
    stops = [int(n) for n in re.findall(r"preemption signal: checkpointing at step (\d+)", err0.read_text())]
    resumes = [int(n) for n in re.findall(r"resumed from \S+/step_\d+ at step (\d+)", err0.read_text())]
    assert stops == resumes and stops[0] == first_stop and first_stop < stops[1] < MAX_STEPS, (stops, resumes)

    # 3. Bit for bit the uninterrupted run.
    r_step, r_raw, r_ema, r_losses = _final(ref_out)
    i_step, i_raw, i_ema, i_losses = _final(out)
    assert r_step == i_step == MAX_STEPS
    assert r_raw.keys() == i_raw.keys() and all(torch.equal(r_raw[k], i_raw[k]) for k in r_raw)
    assert r_ema.keys() == i_ema.keys() and all(torch.equal(r_ema[k], i_ema[k]) for k in r_ema)
    assert sorted(i_losses) == list(range(1, MAX_STEPS + 1)) and i_losses == r_losses


def test_submit_refuses_a_world_size_that_does_not_divide_the_batch(cluster, tmp_path, monkeypatch, capsys):
    from ddistill.cli import main
    from ddistill.exit_codes import ExitCode

    cluster.activate(monkeypatch)
    job = tmp_path / "bad"
    with pytest.raises(SystemExit) as stop:
        main(["submit", CONFIG, *RUN, "train.global_batch_size=6", *SLURM, "--job-dir", str(job)])
    out, err = capsys.readouterr()
    assert stop.value.code == ExitCode.BAD_INPUT and "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("ddistill submit: configuration error:"), err
    assert "global_batch_size=6" in message and "world size 2 (1 nodes x 2 tasks per node)" in message
    assert not job.exists() and cluster.queue() == []  # nothing written, nothing queued
    assert "submitted" not in out


def test_scontrol_hostnames_and_hostfile_of_an_allocation(cluster, tmp_path, monkeypatch):
    """SLURM's expansion (scontrol show hostnames) agrees with ours, and the hostfile helper inside a real job."""
    from ddistill.engine.distributed import expand_nodelist
    from ddistill.launchers import slurm_hostnames

    cluster.activate(monkeypatch)
    for nodelist in ["gpu[01-03,7],login-a", "n[8-11]", "a1,b2", "n[09-11]", "rack1-n[1,3]", "node-[9-10,12]",
                     "a[1-2]b[3-4]", "rack[1-2]-n[3,5]", "solo"]:
        assert slurm_hostnames(nodelist) == expand_nodelist(nodelist), nodelist
    proc = subprocess.run(["srun", "-n", "1", PY, "-m", "ddistill.launchers.multinode", "hostfile", "--slots", "2"],
                          env=_env(cluster, tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "localhost slots=2\n"


def test_scancel_leaves_one_complete_checkpoint_and_jobs_reports_it(cluster, tmp_path):
    """scancel = SIGTERM to every task (then SIGKILL after KillWait): the ranks checkpoint at one step boundary;
    a checkpoint directory only gets its name once complete, so nothing half-written is ever left."""
    from ddistill.engine.checkpoint import list_checkpoints, verify_checkpoint

    env = _env(cluster, tmp_path)
    job, out = tmp_path / "jobs" / "job", tmp_path / "out"
    job_id = _submit(env, job, out)
    _wait("a few steps", lambda: len(_records(out)) >= 3, cluster, job)
    proc = subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _wait("the cancelled job to end", lambda: cluster.job_state(job_id) == "GONE", cluster, job, timeout=120)
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    (step, path), = list_checkpoints(out / "checkpoints")
    assert entries == [path.name] and verify_checkpoint(path) == step >= 3
    row = _jobs(env, job.parent)
    assert row["state"] == "PREEMPTED" and row["detail"] == f"checkpoint at step {step}", row
