"""Launching into an existing out_dir (engine/relaunch.py) and what the run logs across a resume: one rank, CPU,
test-size DiT, the real Trainer. Every refusal must leave the out_dir's files as they were."""

from __future__ import annotations

import json
import shutil
import sys
import types

import numpy as np
import pytest
import yaml

from ddistill.config import ConfigError
from ddistill.engine import relaunch
from ddistill.engine.run_config import run_config_from_dict
from ddistill.engine.trainer import Trainer

V, L = 37, 16


def _config(out_dir, *, model=None, optim=None, train=None, data=None, logging=None, deepspeed=None):
    return run_config_from_dict({
        "model": {"size": "test", "vocab_size": V, "length": L, "dropout": 0.0, **(model or {})},
        "data": {"dataset": "classics", "block_size": L, **(data or {})},
        "method": {"name": "mdlm"},
        "optim": {"lr": 1e-3, "warmup_steps": 2, **(optim or {})},
        "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": str(out_dir),
                  "ckpt_every": 100, "keep_last": 5, "device": "cpu", "export_final": False, "ema_decay": 0.9,
                  **(train or {})},
        "logging": {"wandb": "disabled", "progress_bar": False, **(logging or {})},
        **({"deepspeed": deepspeed} if deepspeed else {}),
    })


def _blocks(num=32):
    return np.random.default_rng(0).integers(0, V - 1, size=(num, L), dtype=np.int64)


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(tmp_path):
    """A run with one checkpoint at step 2 (config.yaml written as by fit)."""
    out = tmp_path / "run"
    trainer = Trainer(_config(out), train_blocks=_blocks())
    for _ in range(2):
        trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])
    trainer.save_checkpoint()
    shutil.copy(out / "checkpoints/step_00000002/config.yaml", out / "config.yaml")
    return out


def test_changed_architecture_or_data_is_refused_naming_the_fields(run_dir):
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        Trainer(_config(run_dir, model={"hidden_size": 32, "length": 24}), train_blocks=_blocks())
    message = str(err.value)
    assert "model.hidden_size: 64 -> 32" in message and "model.length: 16 -> 24" in message
    assert "new train.out_dir" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"data.block_size: 16 -> 8"):
        Trainer(_config(run_dir, data={"block_size": 8}), train_blocks=_blocks())
    assert _snapshot(run_dir) == before


def test_other_changes_need_the_flag_and_are_recorded(run_dir):
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        Trainer(_config(run_dir, optim={"lr": 2e-3}, train={"seed": 3}), train_blocks=_blocks())
    assert "optim.lr: 0.001 -> 0.002" in str(err.value) and "train.seed: 0 -> 3" in str(err.value)
    assert "train.allow_config_change=true" in str(err.value)
    assert _snapshot(run_dir) == before
    cfg = _config(run_dir, optim={"lr": 2e-3}, train={"max_steps": 3, "allow_config_change": True})
    trainer = Trainer(cfg, train_blocks=_blocks())
    assert trainer.step == 2
    assert {(c.key, c.kind) for c in trainer.plan.changes} == {("optim.lr", "flagged"), ("train.max_steps", "safe")}
    summary = trainer.fit()
    assert summary["step"] == 3
    (entry,) = yaml.safe_load((run_dir / relaunch.HISTORY).read_text())
    assert entry["step"] == 2 and entry["checkpoint"] == "step_00000002"
    assert entry["changes"]["optim.lr"] == {"from": 0.001, "to": 0.002, "kind": "flagged"}
    assert entry["changes"]["train.max_steps"] == {"from": 6, "to": 3, "kind": "safe"}
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 0.002 and recorded["train"]["allow_config_change"] is False


def test_safe_changes_are_accepted_and_printed(run_dir, capsys):
    trainer = Trainer(_config(run_dir, train={"max_steps": 4, "log_every": 1, "ckpt_every": 2},
                              logging={"jsonl": False}, deepspeed={"contiguous_gradients": True}),
                      train_blocks=_blocks())
    trainer.fit()
    err = capsys.readouterr().err
    assert "resuming with changed settings (safe on resume): " in err
    assert "train.max_steps: 6 -> 4" in err and "train.log_every: 10 -> 1" in err
    assert "deepspeed.contiguous_gradients: False -> True" in err  # where gradients wait: the same numbers
    assert "logging.jsonl: True -> False" in err
    assert "optim" not in err.split("safe on resume")[1].splitlines()[0]


def test_out_dir_of_something_else_is_refused_untouched(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("learning_rate: 0.1\nepochs: 3\n")
    (foreign / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    before = _snapshot(foreign)
    with pytest.raises(ConfigError, match="holds files but no ddistill run .its config.yaml is not the config"):
        Trainer(_config(foreign), train_blocks=_blocks())
    assert _snapshot(foreign) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="no config.yaml of a ddistill run"):
        relaunch.plan_launch(other, {}, allow_config_change=False, restart_from_scratch=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert relaunch.plan_launch(empty, {}, allow_config_change=False, restart_from_scratch=False).checkpoint is None


def test_run_without_a_usable_checkpoint_restarts_only_when_told(run_dir):
    (run_dir / "checkpoints/step_00000002/MANIFEST.json").unlink()
    (run_dir / "checkpoints/step_00000004").mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n')
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError) as err:
        Trainer(_config(run_dir), train_blocks=_blocks())
    assert "all 2 checkpoint directories are empty or damaged" in str(err.value)
    assert "step_00000004: no MANIFEST.json" in str(err.value) and "train.restart_from_scratch=true" in str(err.value)
    assert _snapshot(run_dir) == before
    trainer = Trainer(_config(run_dir, train={"restart_from_scratch": True, "max_steps": 1}), train_blocks=_blocks())
    assert trainer.step == 0 and trainer.plan.restart
    trainer.fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["loss"] != 3.0  # the old records are gone
    assert yaml.safe_load((run_dir / relaunch.HISTORY).read_text())[0]["restart_from_scratch"] is True


def _records(out_dir):
    keep = ("step", "loss", "loss/student", "nll", "mask_rate", "tokens", "skipped", "skipped_in_window")
    lines = (out_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]


def test_metrics_after_a_resume_hold_each_step_once_with_the_uninterrupted_window_loss(tmp_path):
    train = {"max_steps": 12, "log_every": 4, "ckpt_every": 3}
    full, split = tmp_path / "full", tmp_path / "split"
    Trainer(_config(full, train=train), train_blocks=_blocks()).fit()
    first = Trainer(_config(split, train={**train, "stop_after_steps": 9}), train_blocks=_blocks()).fit()
    assert first["step"] == 9
    # Steps 7-9 are lost (their checkpoint is damaged): the resume from step 6 logs step 8 again, in mid-window.
    (split / "checkpoints/step_00000009/trainer.pt").write_bytes(b"garbage")
    (split / "metrics.jsonl").open("a").write('{"step": 9, "lo')  # a record cut by a kill
    resumed = Trainer(_config(split, train=train), train_blocks=_blocks())
    assert resumed.step == 6 and resumed.window["steps"] == 2
    resumed.fit()
    want, got = _records(full), _records(split)
    assert [r["step"] for r in got] == [4, 8, 12]
    assert got == want  # the same losses, bit for bit, including the window that spans the resume


def test_wandb_run_id_is_kept_in_out_dir(tmp_path, monkeypatch):
    from ddistill.engine.observe import WANDB_ID_FILE, MetricsLogger

    calls, ids = [], iter(["first", "second"])
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: next(ids)),
                                 init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    def open_logger(out_dir):
        logger = MetricsLogger(out_dir=out_dir, enabled=True, jsonl=False, wandb_mode="offline", project="p",
                               run_name=None, config={}, total_steps=1, start_step=0, progress_bar=False)
        logger.close()

    open_logger(tmp_path / "a")
    open_logger(tmp_path / "a")  # the resumed run
    open_logger(tmp_path / "b")
    assert [c["id"] for c in calls] == ["first", "first", "second"]
    assert all(c["resume"] == "allow" for c in calls)
    assert (tmp_path / "a" / WANDB_ID_FILE).read_text().strip() == "first"
