"""Speed switches on CPU: regional compile of the DiT blocks (plumbing and equality through a trace-only backend),
the deepspeed.frozen_gather / train.compile config keys, and bench_engine.py's CPU smoke run."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddistill.config import ConfigError
from ddistill.engine.run_config import run_config_from_dict
from ddistill.engine.trainer import Trainer
from ddistill.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
V, L = 37, 16


def _cfg(tmp_path, **sections):
    base = {"model": {"size": "test", "vocab_size": V, "length": L, "dropout": 0.0},
            "data": {"dataset": "classics", "block_size": L}, "method": {"name": "mdlm"},
            "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_size": 2, "out_dir": str(tmp_path / "run"),
                      "device": "cpu", "export_final": False},
            "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False}}  # fmt: skip
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return run_config_from_dict(base)


def test_compile_blocks_wraps_every_block_and_computes_the_same_function():
    torch.manual_seed(0)
    eager = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.0))
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0.0, 0.2)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks(backend="aot_eager")  # Dynamo + AOTAutograd tracing without Inductor's C++ build
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert eager.blocks[0]._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, sigma = torch.randint(0, V, (2, L)), torch.rand(2)
    out_e, out_c = eager(x, sigma), compiled(x, sigma)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_compile_switch_compiles_the_trained_networks_blocks(tmp_path):
    blocks = np.random.default_rng(0).integers(0, V - 1, size=(8, L), dtype=np.int64)
    plain = Trainer(_cfg(tmp_path / "a"), train_blocks=blocks)
    assert all(b._compiled_call_impl is None for b in plain.nets["student"].module.blocks)
    switched = Trainer(_cfg(tmp_path / "b", train={"compile": True}), train_blocks=blocks)
    assert all(b._compiled_call_impl is not None for b in switched.nets["student"].module.blocks)


@pytest.mark.parametrize(("overrides", "key"), [({"deepspeed": {"frozen_gather": "layer"}}, "deepspeed.frozen_gather"),
                                                ({"deepspeed": {"contiguous_gradients": "no"}},
                                                 "deepspeed.contiguous_gradients"),
                                                ({"train": {"compile": "yes"}}, "train.compile")])
def test_bad_speed_switches_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(tmp_path, **overrides)


def test_bench_engine_cpu_smoke():
    # without the process-group variables an in-process Trainer of an earlier test left behind (its port is taken)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--device", "cpu", "--rows",
                          "mdlm_test", "--variants", "baseline", "--steps", "2", "--no-save"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("mdlm_test"))
    assert "ok (" in line and float(line.split("tokens/s ")[1].split()[0]) > 0, out.stdout[-3000:]


def test_model_flops_count_forward_units():
    """bench_engine's model FLOPs per token in forward units u = 2N + 4·n·d·L (an SDTT step with k teacher steps adds
    k of them to MDLM's 3u): a DiMO step is 5 + 4k units, 6 + 5k with refinement inputs (k = aux_steps)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_engine import model_flops_per_token

    from ddistill.models.dit import ModelConfig, resolve_model_config

    model = resolve_model_config(ModelConfig(size="test", vocab_size=101, length=32))  # as run configs hold it
    mdlm, params = model_flops_per_token(model, "mdlm", 0)
    unit = model_flops_per_token(model, "sdtt", 1)[0] - mdlm
    n_prime = params - 101 * 64  # `test`: d = 64, n = 2 blocks
    assert unit == 2 * n_prime + 4 * 2 * 64 * 32 and mdlm == 3 * unit
    assert model_flops_per_token(model, "dimo", 4)[0] == 21 * unit
    assert model_flops_per_token(model, "dimo", 4, refine=True)[0] == 26 * unit


def test_bench_zero_norm_cpu_smoke():
    """bench_zero_norm.py times DeepSpeed's gradient norm and ours in one process (here a DiMO row: two trained
    networks, a random teacher checkpoint): on CPU the two norms of its random gradients agree bit for bit, and a bad
    count is refused before any trainer is built."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    script = str(ROOT / "benchmarks" / "bench_zero_norm.py")
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--rows", "dimo_test", "--variants", "baseline",
                          "--blocks", "1", "--steps", "1", "--norm-iters", "1", "--no-save"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("dimo_test / baseline"))  # two trained nets
    assert "relative difference 0;" in line and "step " in line, line
    bad = subprocess.run([sys.executable, script, "--device", "cpu", "--rows", "mdlm_test", "--blocks", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--blocks must be >= 1, got 0" in bad.stderr


def test_bench_engine_ab_cpu_smoke():
    """bench_engine_ab.py builds one trainer per arm in one process and times them in alternating blocks (here two
    arms of the CPU row, the second with its own override); bad arms are refused before any trainer is built."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_engine_ab.py"), "--device", "cpu", "--rows",
              "mdlm_test", "--variants", "baseline"]
    out = subprocess.run([*script, "--blocks", "2", "--steps", "1", "--warmup", "1", "--replicas", "2", "--arm",
                          "apart", "--arm", "buffered", "deepspeed.contiguous_gradients=true", "--no-save"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("mdlm_test / baseline / ")]
    assert [ln.split(" / ")[2].split(":")[0] for ln in lines] == ["apart", "buffered"], out.stdout[-2000:]
    assert "(1.000x the first arm)" in lines[0]
    for line in lines:  # two replica trainers an arm, two blocks each: two replica medians, four blocks
        assert line.split("; replicas ")[1].split("]")[0].count("', '") == 1, line
        assert line.split("; blocks ")[1].count("', '") == 3, line
    for argv, message in ((["--arm", "a"], "at least two --arm"),
                          (["--arm", "a", "--arm", "a"], "repeated: ['a']"),
                          (["--arm", "a", "--arm", "b", "train.seed"], "not KEY=VALUE"),
                          (["--arm", "a", "--arm", "b", "deepspeed.contiguous_gradients=maybe"],
                           "deepspeed.contiguous_gradients: expected true or false"),
                          (["--arm", "a", "--arm", "b", "--steps", "0"], "--steps must be >= 1"),
                          (["--arm", "a", "--arm", "b", "--replicas", "0"], "--replicas must be >= 1")):
        bad = subprocess.run([*script, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr[-500:])
        assert "Trainer" not in bad.stderr


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
@pytest.mark.parametrize("poison_at", ["loss", "gradient"])
def test_one_rank_nonfinite_loss_skips_the_step_without_a_host_flag(tmp_path, grad_clip, poison_at):
    """One rank keeps the non-finite flag on the device (no sync before the backward): a NaN loss, or a NaN in one
    parameter's gradient under a finite loss, still skips the step (weights and EMA unchanged, skipped=1) with or
    without clipping, the next finite step applies, and a method error is raised."""
    from ddistill.engine.networks import full_state

    blocks = np.random.default_rng(0).integers(0, V - 1, size=(8, L), dtype=np.int64)
    trainer = Trainer(_cfg(tmp_path, optim={"warmup_steps": 0, "grad_clip": grad_clip}), train_blocks=blocks)
    student = trainer.nets["student"]
    step = trainer.method.step
    poison = {"on": True}
    weight = student.module.blocks[0].attn_qkv.weight
    weight.register_hook(lambda g: g * float("nan") if poison["on"] and poison_at == "gradient" else g)

    def maybe_nan(nets, batch, ctx):
        out = step(nets, batch, ctx)
        if poison["on"] and poison_at == "loss":
            # a NaN value with finite gradients: only the trainer's non-finite flag can make DeepSpeed skip
            out.losses["student"] = out.losses["student"] + torch.tensor(float("nan"))
        return out

    trainer.method.step = maybe_nan
    before, ema_before = full_state(student), full_state(student, use_ema=True)
    metrics = trainer.train_step([next(trainer.loader)])
    assert metrics["skipped"] == 1.0 and "grad_norm/student" not in metrics
    assert all(torch.equal(before[k], v) for k, v in full_state(student).items())
    assert all(torch.equal(ema_before[k], v) for k, v in full_state(student, use_ema=True).items())
    poison["on"] = False
    metrics = trainer.train_step([next(trainer.loader)])
    assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss/student"]) and metrics["grad_norm/student"] > 0
    assert any(not torch.equal(before[k], v) for k, v in full_state(student).items())

    def broken(nets, batch, ctx):
        raise RuntimeError("method failed")

    trainer.method.step = broken
    with pytest.raises(RuntimeError, match="method failed"):
        trainer.train_step([next(trainer.loader)])


ON_DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])


@pytest.fixture(autouse=True)
def _deterministic_attention(request):
    """On CUDA, the math SDPA backend: the fused attention backwards accumulate with atomics, so two runs of the same
    steps would differ in the last bits for a reason other than the one under test."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if getattr(request.node, "callspec", None) and request.node.callspec.params.get("device") == "cuda":
        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


@ON_DEVICES
def test_sync_free_zero_step_matches_deepspeed(tmp_path, monkeypatch, device):
    """networks._remove_redundant_syncs replaces DeepSpeed's norm masking and its clip guard by sync-free versions,
    and its per-gradient norm loop by one multi-tensor norm: the same weights, bit for bit, as DeepSpeed's own
    functions over steps that clip (a tiny grad_clip), and the same skip of a step with a NaN gradient. (On CUDA the
    multi-tensor norm may round differently from DeepSpeed's loop: there it is compared within float rounding.)"""
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import stage_1_and_2

    from ddistill.engine.networks import full_state

    blocks = np.random.default_rng(0).integers(0, V - 1, size=(8, L), dtype=np.int64)

    def run(name: str, deepspeed_own: bool) -> tuple[list[dict], dict]:
        trainer = Trainer(_cfg(tmp_path / name, train={"max_steps": 4, "device": device},
                               optim={"warmup_steps": 0, "grad_clip": 0.05}), train_blocks=blocks)  # fmt: skip
        student = trainer.nets["student"]
        installed = {"unscale_and_clip_grads", "get_grad_norm_direct"}
        assert installed <= set(vars(student.engine.optimizer))  # the sync-free clip and the fused norm
        if deepspeed_own:
            for name in installed:
                delattr(student.engine.optimizer, name)
            monkeypatch.setattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace",
                                ds_utils.mask_nan_or_inf_with_val_inplace)
        poison = {"on": False}
        weight = student.module.blocks[0].attn_qkv.weight
        weight.register_hook(lambda g: g * float("nan") if poison["on"] else g)
        metrics = []
        for step in range(4):
            poison["on"] = step == 2
            metrics.append(trainer.train_step([next(trainer.loader)]))
        monkeypatch.undo()
        return metrics, full_state(student)

    ours, ours_state = run("ours", deepspeed_own=False)
    theirs, theirs_state = run("theirs", deepspeed_own=True)
    assert [m["skipped"] for m in ours] == [0.0, 0.0, 1.0, 0.0]
    assert all(m["grad_norm/student"] > 0.05 for m in ours if not m["skipped"])  # every applied step was clipped
    if device == "cpu":
        assert ours == theirs  # losses and gradient norms, bit for bit
        assert all(torch.equal(ours_state[k], theirs_state[k]) for k in ours_state)
    else:
        assert [m.keys() for m in ours] == [m.keys() for m in theirs]
        for m_ours, m_theirs in zip(ours, theirs):
            assert all(m_ours[k] == pytest.approx(m_theirs[k], rel=1e-5, abs=1e-6) for k in m_ours)
        assert all(torch.allclose(ours_state[k], theirs_state[k], rtol=1e-5, atol=1e-6) for k in ours_state)


@ON_DEVICES
def test_fit_reads_metrics_at_log_lines_with_the_same_values_as_train_step(tmp_path, device):
    """fit() keeps the step metrics on the device until a log line or a checkpoint (train_step_deferred); its log
    records equal a second path that resolves every step at once (train_step) on the same seed: the last step's
    metrics as they are, the window loss as the mean of the window's step losses, tokens/s from the window's tokens."""
    import json

    blocks = np.random.default_rng(0).integers(0, V - 1, size=(8, L), dtype=np.int64)
    train = {"max_steps": 7, "log_every": 3, "ckpt_every": 2, "device": device}
    fitted = Trainer(_cfg(tmp_path / "fit", train=train, logging={"jsonl": True}), train_blocks=blocks)
    fitted.fit()
    records = [json.loads(line) for line in (tmp_path / "fit/run/metrics.jsonl").read_text().splitlines()]
    stepped = Trainer(_cfg(tmp_path / "step", train=train), train_blocks=blocks)
    each = [stepped.train_step([next(stepped.loader)]) for _ in range(7)]
    assert [r["step"] for r in records] == [3, 6, 7]
    for record, window in zip(records, [each[0:3], each[3:6], each[6:7]]):
        assert {k: record[k] for k in window[-1]} == window[-1]
        losses = [m["loss/student"] for m in window]
        assert record["loss"] == sum(losses) / len(losses) and record["skipped_in_window"] == 0
        assert record["tokens_per_s_per_rank"] > 0
