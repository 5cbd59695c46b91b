"""DCD and the DUO curriculum through the real engine on CPU (test-size DiT, DeepSpeed gloo, one rank): DCD's teacher
starts as the pretrained DUO model, becomes the student at the round boundary while δ doubles, and a run killed in
the middle of a round resumes bit for bit; a DUO run resumed inside the curriculum crosses into the plain ELBO
exactly as the uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddistill.engine.networks import full_state
from ddistill.engine.run_config import run_config_from_dict
from ddistill.engine.trainer import Trainer
from ddistill.models.checkpoints import load_pretrained, save_pretrained
from ddistill.models.dit import ModelConfig, build_model

VOCAB, LENGTH = 512, 16  # the smallest classics BPE (the run config checks model and tokenizer agree)
MODEL = {"size": "test", "vocab_size": VOCAB, "length": LENGTH, "dropout": 0.0, "time_conditioning": True}


def _teacher_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**MODEL))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return save_pretrained(model, tmp_path / "teacher", flavor="duo", tokenizer=f"classics-bpe-{VOCAB}")


def _config(tmp_path, method, init_from=None, max_steps=6):
    return run_config_from_dict({
        "model": MODEL,
        "data": {"dataset": "classics", "block_size": LENGTH, "tokenizer": f"classics-bpe-{VOCAB}"},
        "method": method,
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"max_steps": max_steps, "global_batch_size": 4, "micro_batch_size": 2,
                  "out_dir": str(tmp_path / "run"), "ckpt_every": 100, "keep_last": 5, "device": "cpu",
                  "export_final": False, "ema_decay": 0.9},
        "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False},
        "init_from": None if init_from is None else str(init_from),
    })  # fmt: skip


def _blocks():
    return np.random.default_rng(0).integers(0, VOCAB, size=(32, LENGTH), dtype=np.int64)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _step(trainer):
    return trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])


@pytest.mark.slow
def test_dcd_rounds_and_bitwise_resume_through_engine(tmp_path):
    init = _teacher_dir(tmp_path)
    pretrained = {n: p.detach().clone() for n, p in load_pretrained(init)[0].named_parameters()}
    method = {"name": "dcd", "base_num_steps": 8, "num_rounds": 3, "steps_per_round": 2}
    cfg = _config(tmp_path, method, init)
    first = Trainer(cfg, train_blocks=_blocks())
    teacher, student = first.nets["teacher"], first.nets["student"]
    assert _same(full_state(teacher), pretrained) and first.nets["student"].ema.decay == 0.9
    metrics = [_step(first), _step(first)]  # round 0; step 1 ends it: teacher <- raw student
    # The boundary step logs the next round's δ (on_step_end's metrics come last).
    assert [m["delta"] for m in metrics] == [1 / 8, 2 / 8] and metrics[0]["loss/student"] > 0
    promoted = full_state(student)
    assert _same(full_state(teacher), promoted) and not _same(promoted, pretrained)
    metrics.append(_step(first))
    assert metrics[-1]["delta"] == 2 / 8
    first.save_checkpoint()  # 3 steps done: inside round 1
    rest = [_step(first) for _ in range(3)]
    assert first.method.round == 2 and rest[-1]["delta"] == 4 / 8
    final_teacher, final_ema = full_state(teacher), full_state(student, use_ema=True)

    resumed = Trainer(cfg, train_blocks=_blocks())
    assert resumed.step == 3 and resumed.method.round == 1
    assert _same(full_state(resumed.nets["teacher"]), promoted)  # the promoted teacher, not the pretrained one
    again = [_step(resumed) for _ in range(3)]
    assert [a["loss/student"] for a in again] == [r["loss/student"] for r in rest]
    assert _same(full_state(resumed.nets["teacher"]), final_teacher)
    assert _same(full_state(resumed.nets["student"], use_ema=True), final_ema)


@pytest.mark.parametrize("divergence", ["kl_rev", "kl_fwd"])
def test_fused_dcd_loss_equals_the_torch_loss_through_the_engine(tmp_path, divergence):
    """loss_impl=triton and =chunked (hidden states + the fused distillation kernel, Triton interpreter on CPU) give
    the torch path's losses and gradient norms over steps that cross a round boundary (the teacher swap included)."""
    init = _teacher_dir(tmp_path)
    runs = {}
    for impl in ("torch", "triton", "chunked"):
        method = {"name": "dcd", "base_num_steps": 8, "num_rounds": 2, "steps_per_round": 2, "divergence": divergence,
                  "loss_impl": impl}
        trainer = Trainer(_config(tmp_path / impl, method, init, max_steps=3), train_blocks=_blocks())
        runs[impl] = [_step(trainer) for _ in range(3)]
    for key, fused in ((k, f) for k in ("loss/student", "grad_norm/student") for f in ("triton", "chunked")):
        torch_values, fused_values = ([m[key] for m in runs[impl]] for impl in ("torch", fused))
        assert fused_values == pytest.approx(torch_values, rel=2e-4, abs=1e-6), (key, fused)
    assert runs["triton"][0]["loss/student"] > 0


def test_fused_dcd_loss_refuses_fp64():
    from ddistill.methods.dcd import DCDConfig

    with pytest.raises(ValueError, match="loss_impl='triton'.*fp32"):
        DCDConfig(loss_impl="triton", loss_precision="fp64")


@pytest.mark.slow
def test_duo_resume_inside_the_curriculum_is_bitwise(tmp_path):
    method = {"name": "duo", "curriculum_end": 2, "top_k": 4, "gamma_min": -3.0, "gamma_max": -1.0}
    cfg = _config(tmp_path, method, max_steps=4)
    first = Trainer(cfg, train_blocks=_blocks())
    head = [_step(first)]
    first.save_checkpoint()
    rest = [_step(first) for _ in range(3)]
    assert [m["curriculum"] for m in head + rest] == [1.0, 1.0, 0.0, 0.0] and 0 <= head[0]["tail_bound"] < 1e-6
    resumed = Trainer(cfg, train_blocks=_blocks())
    assert resumed.step == 1
    again = [_step(resumed) for _ in range(3)]
    assert [a["loss/student"] for a in again] == [r["loss/student"] for r in rest]
    assert _same(full_state(resumed.nets["student"]), full_state(first.nets["student"]))
