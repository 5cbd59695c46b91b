"""`ddistill` command line: sampling from a public-layout checkpoint on CPU, and clear errors on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ddistill.models import ModelConfig, build_model, save_pretrained

MASK_ID = 50257


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ddistill.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def mdlm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", time_conditioning=False, length=24))
    with torch.no_grad():  # a zero-initialised output layer would give uniform logits
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "mdlm", flavor="mdlm")


def test_sample_from_public_layout_checkpoint(mdlm_checkpoint, tmp_path):
    out = tmp_path / "samples.jsonl"
    proc = run_cli("sample", str(mdlm_checkpoint), "--steps", "6", "--num-samples", "3", "--batch-size", "2",
                   "--seed", "7", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert len(rec["token_ids"]) == 24  # the checkpoint's length
        assert all(0 <= t < MASK_ID for t in rec["token_ids"])  # fully unmasked, never the mask id
        assert 1 <= rec["nfe"] <= 7 and rec["steps"] == 6
    assert "NFE=" in proc.stdout
    # Same seed, same samples: the sampler is deterministic given its generator.
    again = tmp_path / "again.jsonl"
    proc = run_cli("sample", str(mdlm_checkpoint), "--steps", "6", "--num-samples", "3", "--batch-size", "2",
                   "--seed", "7", "--device", "cpu", "--out", str(again))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["token_ids"] for line in again.read_text().splitlines()] == [
        r["token_ids"] for r in records
    ]


def test_bad_inputs_get_clear_errors(mdlm_checkpoint, tmp_path):
    proc = run_cli("sample", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert "cannot tell whether" in proc.stderr or "does not exist" in proc.stderr
    proc = run_cli("sample", str(tmp_path / "nope"), "--process", "absorbing")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = run_cli("frobnicate")
    assert proc.returncode != 0 and "unknown command 'frobnicate'" in proc.stderr
    proc = run_cli("prepare", "dataset=imagenet")
    assert proc.returncode != 0 and "imagenet" in proc.stderr
