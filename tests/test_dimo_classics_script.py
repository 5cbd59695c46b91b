"""scripts/dimo_classics.py on CPU with a test-size DiT and a 64-id toy vocabulary: one teacher for several DiMO runs
(--teacher-only, then --teacher), and the EMA snapshots along training, whose last one must equal the exported
generator's one-step samples token for token (the in-memory EMA copy against the export → load path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.vocab_size=64", "train.global_batch_size=4", "train.micro_batch_size=4"]

pytestmark = pytest.mark.slow


def _run(*args):
    out = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "run", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_teacher_only_then_snapshots_along_a_dimo_run(tmp_path):
    tokens = tmp_path / "blocks.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 63, size=(16, 16), dtype=np.int64))
    common = ["--tokens", str(tokens), "--size", "test", "--device", "cpu", "--num-samples", "4", "--batch-size", "4"]
    _run(*common, "--out", str(tmp_path / "t"), "--teacher-only", "--teacher-steps", "2", "--teacher-seconds", "600",
         "--teacher-overrides", *SMALL)
    teacher = tmp_path / "t/teacher/export/student"
    assert (teacher / "model.safetensors").is_file() and not (tmp_path / "t/samples.pt").exists()
    _run(*common, "--out", str(tmp_path / "d"), "--teacher", str(teacher), "--dimo-steps", "4", "--dimo-seconds",
         "600", "--snapshot-every", "2", "--teacher-sample-steps", "--dimo-sample-steps", "1", "--temperatures",
         "1.3", "--temperature-steps", "1", "2", "--dimo-overrides", *SMALL, "method.aux_steps=1", "networks.generator.optim.lr=0.05",
         "networks.generator.optim.warmup_steps=0")  # a large lr, so that steps 2 and 4 sample differently
    samples = torch.load(tmp_path / "d/samples.pt")["samples"]
    assert set(samples) == {"dimo", "dimo@2", "dimo@4", "dimo T=1.3"}  # no teacher rows were asked for
    assert set(samples["dimo T=1.3"]) == {1, 2}  # one curve across the temperature's step counts
    assert not torch.equal(samples["dimo T=1.3"][1], samples["dimo"][1])  # the same seeds, another temperature
    assert torch.equal(samples["dimo@4"][1], samples["dimo"][1])
    assert not torch.equal(samples["dimo@2"][1], samples["dimo@4"][1])


@pytest.mark.parametrize("bad, message", [(["--snapshot-every", "-1"], "--snapshot-every -1 must be >= 0"),
                                          (["--teacher-only", "--teacher", "x"], "cannot be given with --teacher"),
                                          (["--temperature-steps", "0"], "must be >= 1"),
                                          (["--temperatures", "1.2", "0"], "must all be > 0")])
def test_bad_arguments_name_the_problem(tmp_path, bad, message):
    tokens = tmp_path / "blocks.npy"
    np.save(tokens, np.zeros((4, 16), dtype=np.int64))
    out = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "run", "--tokens", str(tokens),
                          "--out", str(tmp_path / "o"), *bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and not (tmp_path / "o").exists()
