"""`ddistill train` exit codes (ddistill/exit_codes.py) through real subprocesses of the CLI on CPU: a test-size DiT
on a local text corpus (GPT-2 tokenizer), one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddistill.exit_codes import ExitCode, exit_code_for_stop

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/experiments/classics_mdlm_test.yaml"

pytestmark = pytest.mark.slow


def _overrides(tmp_path, out_dir, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i % 7} times."
                                      for i in range(200)))
    return ["data.dataset=text", f"data.path={corpus}", "data.sample_by=paragraph", "data.max_documents=null",
            f"data.cache_dir={tmp_path / 'tokens'}", "data.block_size=16", "model.length=16", "train.eval_every=0",
            "train.device=cpu", "train.global_batch_size=2", "train.micro_batch_size=2", "train.log_every=1",
            "logging.progress_bar=false", f"train.out_dir={out_dir}", *extra]


def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(tmp_path, overrides, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "ddistill.cli", "train", CONFIG, *overrides], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_stop_reasons_map_to_distinct_codes():
    codes = {reason: exit_code_for_stop(reason) for reason in ("max_steps", "stop_after_steps", "nonfinite",
                                                                "preempted")}
    assert codes["max_steps"] == codes["stop_after_steps"] == 0
    assert len({0, ExitCode.FAILED, ExitCode.BAD_INPUT, codes["nonfinite"], codes["preempted"]}) == 5
    with pytest.raises(ValueError, match="unknown stop reason"):
        exit_code_for_stop("bored")


def test_bad_config_exits_2_with_one_line(tmp_path):
    proc = _train(tmp_path, _overrides(tmp_path, tmp_path / "bad", "train.max_stpes=3"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.BAD_INPUT == 2
    assert "configuration error: unknown config key 'train.max_stpes' (did you mean 'max_steps'?)" in err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()


def test_preemption_exits_75_after_a_checkpoint_and_the_relaunch_finishes_with_0(tmp_path):
    out_dir = tmp_path / "pre"
    proc = _train(tmp_path, _overrides(tmp_path, out_dir, "train.max_steps=100000", "train.ckpt_every=100000"),
                  start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out_dir / "metrics.jsonl").is_file() or len(_records(out_dir)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == ExitCode.PREEMPTED == 75, err[-3000:]
    assert "preemption signal: checkpointing at step" in err
    step = _records(out_dir)[-1]["step"]
    assert (out_dir / f"checkpoints/step_{step:08d}/MANIFEST.json").is_file()
    again = _train(tmp_path, _overrides(tmp_path, out_dir, f"train.max_steps={step + 1}", "train.ckpt_every=100000"))
    out, err = again.communicate(timeout=240)
    assert again.returncode == ExitCode.FINISHED == 0, err[-3000:]
    assert f"resumed from {out_dir}/checkpoints/step_{step:08d}" in err
    assert f"train.max_steps: 100000 -> {step + 1}" in err  # a safe change, printed
    assert [r["step"] for r in _records(out_dir)] == list(range(1, step + 2))


def test_nonfinite_stop_exits_3_with_advice_that_fits_the_config(tmp_path):
    out_dir = tmp_path / "nan"
    proc = _train(tmp_path, _overrides(tmp_path, out_dir, "train.max_steps=20", "optim.lr=1e30", "optim.grad_clip=0",
                                       "optim.warmup_steps=0", "train.max_consecutive_nonfinite=2"))
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == ExitCode.NONFINITE == 3, err[-3000:]
    assert "turn gradient clipping on (e.g. optim.grad_clip=1.0; it is off)" in err
    assert "raise optim.grad_clip" not in err
    records = _records(out_dir)
    assert records[0]["skipped"] == 0.0 and "loss" in records[0]  # the first step is applied, then it diverges
    skipped = [r for r in records if r["skipped"]]
    assert len(skipped) == 2 and all("loss" not in r and r["skipped_in_window"] == 1 for r in skipped)
