"""Time from `ddistill submit` to the first training step on a real (local, one-node) SLURM.

    python benchmarks/bench_submit.py --repeats 2          # appends to results/submit.csv, rewrites submit.md

Starts the test cluster of tests/local_slurm.py (munge + slurmctld + slurmd on localhost, `--cpus` CPUs; Debian
packages installed when missing and root), then submits `--repeats` 2-task CPU jobs of the classics test model
(configs/experiments/classics_mdlm_test.yaml, 16-token blocks, 3 steps) one after the other, and records for each:
the wall time of the `ddistill submit` command itself (config check, job folder, code snapshot, sbatch), the time
from its start to rank 0's first logged step (scheduling + Python/DeepSpeed start-up + data + engine init on both
ranks + one step), and to the job's end. Every row records the CPU, the load average at the start (the machine
may be shared), the SLURM / torch / DeepSpeed / submitit versions and the git revision.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the local cluster helper

from local_slurm import LocalSlurm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "submit.csv"
MD_PATH = RESULTS / "submit.md"
FIELDS = ["timestamp", "cpu", "load_avg_1m", "slurm", "torch", "deepspeed", "submitit", "git_rev", "tasks",
          "submit_cmd_s", "submit_to_first_step_s", "submit_to_end_s", "status"]
RUN = ["train.device=cpu", "model.length=16", "data.block_size=16", "train.global_batch_size=4",
       "train.micro_batch_size=2", "train.max_steps=3", "train.log_every=1", "train.eval_every=0",
       "logging.progress_bar=false"]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def _versions(env) -> dict[str, str]:
    import deepspeed
    import submitit
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import git_revision

    slurm = subprocess.run(["sinfo", "--version"], env=env, capture_output=True, text=True).stdout.split()
    return {"slurm": slurm[-1] if slurm else "?", "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "submitit": submitit.__version__, "git_rev": git_revision()}


def _one(cluster: LocalSlurm, work: Path, index: int, env: dict) -> dict[str, object]:
    job_dir, out_dir = work / f"job{index}", work / f"out{index}"
    cmd = [sys.executable, "-m", "ddistill.cli", "submit", str(ROOT / "configs/experiments/classics_mdlm_test.yaml"),
           *RUN, f"train.out_dir={out_dir}", "--launcher", "slurm", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--cpus-per-task", "1", "--time", "10", "--signal-delay-s", "60", "--job-dir", str(job_dir)]
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    submitted = time.time()
    if proc.returncode != 0:
        return {"submit_cmd_s": submitted - start, "status": f"submit failed: {proc.stderr.strip()[-300:]}"}
    job_id = json.loads((job_dir / "submit.json").read_text())["job_ids"][-1]
    metrics = out_dir / "metrics.jsonl"
    first = None
    deadline = start + 600
    while time.time() < deadline:
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = json.loads(metrics.read_text().splitlines()[0])["time"]
        if cluster.job_state(job_id) == "GONE":
            break
        time.sleep(0.05)
    end = time.time()
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    status = "ok" if len(lines) == 3 else f"job ended with {len(lines)} of 3 steps logged (see {job_dir})"
    return {"submit_cmd_s": round(submitted - start, 2), "submit_to_first_step_s": round(first - start, 2) if first
            else "", "submit_to_end_s": round(end - start, 2), "status": status}


def write_markdown() -> None:
    rows = list(csv.DictReader(CSV_PATH.open()))
    header = ["timestamp", "cpu", "load_avg_1m", "slurm", "git_rev", "tasks", "submit_cmd_s",
              "submit_to_first_step_s", "submit_to_end_s", "status"]
    lines = ["# `ddistill submit` -> first training step on a local one-node SLURM",
             "", "Written by `benchmarks/bench_submit.py` (2-task CPU job, classics test model, 16-token blocks).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="jobs submitted one after the other")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local SLURM node")
    parser.add_argument("--no-save", action="store_true", help="print the rows, do not append to the CSV")
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    with tempfile.TemporaryDirectory(prefix="ddistill-bench-submit-") as tmp, LocalSlurm(Path(tmp) / "slurm",
                                                                                         cpus=args.cpus) as cluster:
        env = dict(cluster.env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
                   HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        common = {"cpu": _cpu(), **_versions(env), "tasks": 2}
        rows = []
        for index in range(args.repeats):
            row = {"timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "load_avg_1m": f"{os.getloadavg()[0]:.1f}", **common, **_one(cluster, Path(tmp), index, env)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.no_save:
        return
    RESULTS.mkdir(exist_ok=True)
    new = not CSV_PATH.is_file()
    with CSV_PATH.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in FIELDS} for row in rows)
    write_markdown()


if __name__ == "__main__":
    main()
