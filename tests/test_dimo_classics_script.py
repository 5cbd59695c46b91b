"""scripts/dimo_classics.py on CPU with a test-size DiT and a 64-id toy vocabulary: one teacher for several DiMO runs
(--teacher-only, then --teacher), and the EMA snapshots along training, whose last one must equal the exported
generator's one-step samples token for token (the in-memory EMA copy against the export → load path)."""

from __future__ import annotations

import json
import math
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
         "1.3", "--temperature-steps", "1", "2", "--remask-powers", "1", "2", "--dimo-overrides", *SMALL, "method.aux_steps=1", "networks.generator.optim.lr=0.05",
         "networks.generator.optim.warmup_steps=0")  # a large lr, so that steps 2 and 4 sample differently
    samples = torch.load(tmp_path / "d/samples.pt")["samples"]
    assert set(samples) == {"dimo", "dimo@2", "dimo@4", "dimo T=1.3", "dimo T=1.3 p=2.0"}  # no teacher rows asked for
    assert set(samples["dimo T=1.3"]) == {1, 2}  # one curve across the temperature's step counts
    # the re-mask power acts from step 2 on (here 5 vs 2 of 16 positions redrawn), on the same seeds
    assert torch.equal(samples["dimo T=1.3 p=2.0"][1], samples["dimo T=1.3"][1])
    assert not torch.equal(samples["dimo T=1.3 p=2.0"][2], samples["dimo T=1.3"][2])
    assert not torch.equal(samples["dimo T=1.3"][1], samples["dimo"][1])  # the same seeds, another temperature
    assert torch.equal(samples["dimo@4"][1], samples["dimo"][1])
    assert not torch.equal(samples["dimo@2"][1], samples["dimo@4"][1])


@pytest.mark.parametrize("bad, message", [(["--snapshot-every", "-1"], "--snapshot-every -1 must be >= 0"),
                                          (["--teacher-only", "--teacher", "x"], "cannot be given with --teacher"),
                                          (["--temperature-steps", "0"], "must be >= 1"),
                                          (["--temperatures", "1.2", "0"], "must all be > 0"),
                                          (["--remask-powers", "2", "0"], "must all be finite and > 0")])
def test_bad_arguments_name_the_problem(tmp_path, bad, message):
    tokens = tmp_path / "blocks.npy"
    np.save(tokens, np.zeros((4, 16), dtype=np.int64))
    out = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "run", "--tokens", str(tokens),
                          "--out", str(tmp_path / "o"), *bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and not (tmp_path / "o").exists()


def _score(out, *extra, judge):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "score", "--out", str(out),
                           "--judge", str(judge), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_score_intervals_and_the_teacher_reference(tmp_path):
    """Gen PPL = exp(Σ nll / Σ tokens) of the kept per-sample scores, inside its interval; the ratio to the teacher
    from this run's teacher rows equals the one from another run's (--reference), and both equal the scores' ratio."""
    from test_eval_judge import WORDS, _tiny_judge_dir

    from ddistill.data.tokenizer import get_tokenizer
    from ddistill.eval.report import read_csv

    judge = _tiny_judge_dir(tmp_path / "judge")
    tok = get_tokenizer()
    ids = [tok.encode(" " + w)[0] for w in WORDS]
    rng = np.random.default_rng(0)
    rows = {k: torch.tensor(np.asarray(ids)[rng.integers(0, len(ids), size=(6, 10))]) for k in ("t", "d", "d2")}
    log = json.dumps({"device": "cpu"})
    for name, samples in {"a": {"teacher": {1: rows["t"]}, "dimo": {1: rows["d"]}},
                          "b": {"dimo": {1: rows["d"]}, "dimo T=2": {1: rows["d2"]}}}.items():
        (tmp_path / name).mkdir()
        torch.save({"samples": samples, "length": 10}, tmp_path / name / "samples.pt")
        (tmp_path / name / "train_log.json").write_text(log)
    _score(tmp_path / "a", judge=judge)
    _score(tmp_path / "b", "--reference", str(tmp_path / "a"), judge=judge)
    scores = torch.load(tmp_path / "a/eval/scores.pt", weights_only=False)
    (nll, count), (t_nll, t_count) = scores["dimo", 1], scores["teacher", 1]
    a = {r.label: r for r in read_csv(tmp_path / "a/eval/dimo_classics.csv")}
    b = {r.label: r for r in read_csv(tmp_path / "b/eval/dimo_classics.csv")}
    assert a["dimo"].gen_ppl == pytest.approx(math.exp(nll.sum() / count.sum()), rel=1e-6)
    assert a["dimo"].gen_ppl_lo <= a["dimo"].gen_ppl <= a["dimo"].gen_ppl_hi
    expected = math.exp(nll.sum() / count.sum() - t_nll.sum() / t_count.sum())
    assert a["dimo"].ppl_ratio == pytest.approx(expected, rel=1e-6) == b["dimo"].ppl_ratio
    assert a["dimo"].ppl_ratio_lo <= a["dimo"].ppl_ratio <= a["dimo"].ppl_ratio_hi
    assert a["teacher"].ppl_ratio is None and b["dimo T=2"].ppl_ratio is not None


def test_score_refuses_a_reference_that_was_not_scored(tmp_path):
    (tmp_path / "a").mkdir()
    torch.save({"samples": {}, "length": 4}, tmp_path / "a/samples.pt")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "score", "--out", str(tmp_path / "a"),
                           "--reference", str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "has no eval/scores.pt; score it first" in proc.stderr


def test_score_refuses_rows_that_were_not_sampled(tmp_path):
    torch.save({"samples": {"dimo": {1: torch.zeros(2, 4, dtype=torch.long)}}, "length": 4}, tmp_path / "samples.pt")
    (tmp_path / "train_log.json").write_text(json.dumps({"device": "cpu"}))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/dimo_classics.py"), "score", "--out", str(tmp_path),
                           "--rows", "dimo:1", "dimo:4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--rows ['dimo:4'] are not in" in proc.stderr
    assert not (tmp_path / "eval").exists()
