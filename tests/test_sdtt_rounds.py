"""Round-by-round evaluation (ddistill.eval.rounds, `ddistill rounds`): the checkpoints of the students the run's
method lists, loading their EMA weights, and one report with a curve per round (tiny GPT-2 judge, test-size DiT,
CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ddistill.data.tokenizer import VOCAB_SIZE
from ddistill.eval.report import read_csv
from ddistill.cli import run_method
from ddistill.eval.rounds import RoundStudent, evaluate_rounds, load_checkpoint_student, run_students
from ddistill.methods.base import EvalStudent
from ddistill.models.dit import build_model


MODEL = {"size": "test", "vocab_size": VOCAB_SIZE, "length": 16, "dropout": 0.0, "time_conditioning": False}
METHOD = {"name": "sdtt", "steps_per_round": 2, "num_rounds": 2, "initial_teacher_steps": 8, "num_teacher_steps": 2}


def find_round_students(root):
    """What `ddistill rounds --run-dir` evaluates: the students the run's method lists, found on disk."""
    return run_students(root, run_method(root).eval_students())


def _write_checkpoint(root, step, seed, *, manifest=True, model=MODEL):
    path = root / "checkpoints" / f"step_{step:08d}"
    (path / "ema").mkdir(parents=True)
    config = {"model": model, "method": METHOD, "data": {"dataset": "classics", "block_size": 16},
              "train": {"max_steps": 4, "global_batch_size": 2, "micro_batch_size": 2, "out_dir": str(root)}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(seed)
    net = build_model(MODEL)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    shadow = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.save({"decay": 0.9999, "num_updates": step, "shadow": shadow}, path / "ema" / "student.pt")
    if manifest:
        (path / "MANIFEST.json").write_text(json.dumps({"step": step}))
    return path, shadow


def _gpt2_vocab_judge_dir(root):
    """A 2-layer GPT-2 judge with the GPT-2 tokenizer, so every decoded sample gives judge tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ddistill.data.tokenizer import EOS_ID, get_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS_ID,
                     eos_token_id=EOS_ID)
    out = root / "judge"
    GPT2LMHeadModel(cfg).save_pretrained(out)
    get_tokenizer().save_pretrained(out)
    return out


@pytest.fixture()
def run_dir(tmp_path):
    shadows = {}
    for step in (2, 3, 4, 6):  # 3: inside round 2; 6: past the last round
        shadows[step] = _write_checkpoint(tmp_path, step, seed=step)[1]
    _write_checkpoint(tmp_path, 8, seed=8, manifest=False)  # unfinished: no manifest
    return tmp_path, shadows


def test_find_and_load_round_students(run_dir):
    root, shadows = run_dir
    students = find_round_students(root)
    assert [(s.label, s.path.name, s.trained_steps) for s in students] == [
        ("round 1", "step_00000002", 4),
        ("round 2", "step_00000004", 2),
    ]
    model = load_checkpoint_student(students[1].path)
    for name, param in model.named_parameters():
        assert torch.equal(param, shadows[4][name])
    with pytest.raises(FileNotFoundError, match="not a training run"):
        find_round_students(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="none of the students"):
        run_students(root, [EvalStudent(label="round 9", step=18, network="student", sampler="mdlm")])
    with pytest.raises(ValueError, match="sampler 'dimo' has no evaluator"):
        RoundStudent(label="x", path=root, sampler="dimo")


def test_load_rejects_a_mismatched_model(tmp_path):
    path, _ = _write_checkpoint(tmp_path, 2, seed=0, model={**MODEL, "size": "tiny"})
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint_student(path)


def test_evaluate_rounds_writes_one_report_with_a_curve_per_round(run_dir, tmp_path_factory):
    root, _ = run_dir
    judge_dir = _gpt2_vocab_judge_dir(tmp_path_factory.mktemp("judge"))
    students = find_round_students(root)
    extra = RoundStudent(label="again", path=students[0].path, trained_steps=None)
    out = root / "eval"
    rows = evaluate_rounds(
        [*students, extra], [2, 4], out_dir=out, judge_name=str(judge_dir), num_samples=2, batch_size=2, length=16,
        device="cpu",
    )  # fmt: skip
    assert [(r.label, r.steps) for r in rows] == [
        ("round 1", 2), ("round 1", 4), ("round 2", 2), ("round 2", 4), ("again", 2), ("again", 4),
    ]  # fmt: skip
    assert [(r.label, r.steps) for r in read_csv(out / "rounds.csv")] == [(r.label, r.steps) for r in rows]
    assert (out / "rounds.png").stat().st_size > 0 and "round 2" in (out / "rounds.md").read_text()
    # The same checkpoint under another label reproduces its numbers; different rounds' weights give other samples.
    assert [r.gen_ppl for r in rows[4:]] == [r.gen_ppl for r in rows[:2]]
    samples = {label: (out / "samples" / f"{label}_T4.jsonl").read_text() for label in ("round_1", "round_2")}
    assert samples["round_1"] != samples["round_2"]


def test_duo_students_are_sampled_with_both_tails(run_dir, tmp_path_factory):
    root, _ = run_dir
    judge_dir = _gpt2_vocab_judge_dir(tmp_path_factory.mktemp("judge"))
    path = root / "checkpoints" / "step_00000002"
    students = [RoundStudent(label="dcd", path=path, sampler="duo")]
    rows = evaluate_rounds(students, [2], out_dir=root / "eval_duo", judge_name=str(judge_dir), num_samples=2,
                           batch_size=2, length=16, device="cpu", tails=("ancestral", "greedy"))
    assert [(r.label, r.steps, r.nfe) for r in rows] == [("dcd ancestral", 2, 3.0), ("dcd greedy", 2, 3.0)]
    texts = {t: (root / "eval_duo" / "samples" / f"dcd_{t}_T2.jsonl").read_text() for t in ("ancestral", "greedy")}
    assert texts["ancestral"] != texts["greedy"]  # same seed, other final step
    with pytest.raises(ValueError, match="tails"):
        evaluate_rounds(students, [2], out_dir=root, judge_name=str(judge_dir), num_samples=2, batch_size=2,
                        tails=("top-p",))
