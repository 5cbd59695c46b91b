"""SDTT through the real engine on CPU (test-size DiT, DeepSpeed gloo, one rank): the teacher starts as the
pretrained checkpoint, becomes the student at the round boundary, and a resume in the middle of round 1 restores
that teacher (not the pretrained one), the round, and continues with identical losses, without the init_from
checkpoint. The frozen teacher is written at the first checkpoint after each change and linked by the next ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ddistill.config import ConfigError
from ddistill.engine.networks import full_state
from ddistill.engine.run_config import run_config_from_dict
from ddistill.engine.trainer import Trainer
from ddistill.models.checkpoints import load_pretrained, save_pretrained
from ddistill.models.dit import ModelConfig, build_model

VOCAB, LENGTH = 37, 16


def _teacher_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=VOCAB, length=LENGTH, dropout=0.0, time_conditioning=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return save_pretrained(model, tmp_path / "teacher", flavor="mdlm")


def _config(tmp_path, init_from, model=None, **method):
    return run_config_from_dict(
        {
            "model": {"size": "test", "vocab_size": VOCAB, "length": LENGTH, "dropout": 0.0,
                      "time_conditioning": False, **(model or {})},
            "data": {"dataset": "classics", "block_size": LENGTH},
            "method": {"name": "sdtt", "initial_teacher_steps": 16, "num_rounds": 3, "steps_per_round": 2,
                       "t_min": 0.05, **method},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": str(tmp_path / "run"),
                      "ckpt_every": 100, "keep_last": 5, "device": "cpu", "export_final": False, "ema_decay": 0.9},
            "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False},
            "init_from": str(init_from),
        }
    )


def _blocks():
    return np.random.default_rng(0).integers(0, VOCAB - 1, size=(32, LENGTH), dtype=np.int64)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _step(trainer):
    return trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])


@pytest.mark.slow
@pytest.mark.parametrize("teacher_from", ["raw", "ema"])
def test_sdtt_rounds_and_resume_through_engine(tmp_path, teacher_from):
    init = _teacher_dir(tmp_path)
    pretrained = {n: p.detach().clone() for n, p in load_pretrained(init)[0].named_parameters()}
    cfg = _config(tmp_path, init, teacher_from=teacher_from)

    first = Trainer(cfg, train_blocks=_blocks())
    teacher, student = first.nets["teacher"], first.nets["student"]
    assert _same(full_state(teacher), pretrained) and _same(full_state(student), pretrained)
    assert first.grad_accum == 2 and first.method.sampler_spec()["num_steps"] == 8

    metrics = [_step(first)]  # step 0 of round 0
    assert _same(full_state(teacher), pretrained) and not _same(full_state(student), pretrained)
    assert metrics[0]["loss/student"] > 0 and metrics[0]["student_steps"] == 8
    metrics.append(_step(first))  # step 1 ends round 0: teacher <- student
    promoted = full_state(student, use_ema=teacher_from == "ema")
    assert _same(full_state(teacher), promoted) and not _same(promoted, pretrained)
    assert first.method.round == 1 and first.method.sampler_spec()["num_steps"] == 4
    first.save_checkpoint()  # step 2: the promoted teacher is written
    metrics.append(_step(first))  # step 2, in round 1
    first.save_checkpoint()  # at 3 completed steps, in the middle of round 1: the same teacher, linked
    rest = [_step(first) for _ in range(3)]  # steps 3 (ends round 1), 4, 5
    assert first.method.round == 2 and first.method.sampler_spec()["num_steps"] == 2
    final_teacher = full_state(teacher)
    teacher_file = {s: tmp_path / f"run/checkpoints/step_{s:08d}/frozen/teacher.pt" for s in (2, 3, 4, 5)}
    assert teacher_file[2].stat().st_ino == teacher_file[3].stat().st_ino  # written once for both checkpoints
    assert _same(torch.load(teacher_file[3]), promoted)

    shutil.rmtree(init)  # a resume reads everything from the checkpoint
    resumed = Trainer(cfg, train_blocks=_blocks())
    assert resumed.step == 3 and resumed.method.round == 1 and resumed.method.state_dict()["teacher_updated_at"] == 2
    assert _same(full_state(resumed.nets["teacher"]), promoted)  # the promoted teacher, not the pretrained one
    again = []
    for _ in range(3):  # steps 3 (ends round 1: a new teacher), 4, 5, each checkpointed
        again.append(_step(resumed))
        resumed.save_checkpoint()
    for a, b in zip(rest, again):
        assert a["loss/student"] == b["loss/student"]  # bit for bit
        assert a["round"] == b["round"] and a["student_steps"] == b["student_steps"]
    assert _same(full_state(resumed.nets["teacher"]), final_teacher)
    assert teacher_file[4].stat().st_ino != teacher_file[3].stat().st_ino  # changed at step 4: written again
    assert teacher_file[4].stat().st_ino == teacher_file[5].stat().st_ino
    assert _same(torch.load(teacher_file[5]), final_teacher)


def test_init_from_with_another_architecture_is_refused_naming_the_fields(tmp_path):
    init = _teacher_dir(tmp_path)
    with pytest.raises(ConfigError) as err:
        Trainer(_config(tmp_path, init, model={"length": 32, "time_conditioning": True}), train_blocks=_blocks())
    message = str(err.value)
    assert "model.length=32 (checkpoint: 16)" in message
    assert "model.time_conditioning=True (checkpoint: False)" in message
    assert "hidden_size" not in message  # only the fields that disagree
    assert not (tmp_path / "run").exists()  # nothing was written
