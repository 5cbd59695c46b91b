"""Multi-rank engine tests: real 2-rank gloo process groups started with torchrun (CPU), each under a timeout.

This file is also the worker: `torchrun ... tests/test_engine_dist.py MODE ARGS.json` (see `_worker`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
V, BLOCK = 37, 16

pytestmark = pytest.mark.slow

BASE = [
    "model.size=test", f"model.vocab_size={V}", "model.dropout=0.1", f"model.length={BLOCK}",
    f"data.block_size={BLOCK}", "logging.wandb=disabled", "logging.progress_bar=false", "train.device=cpu",
    "optim.warmup_steps=2", "optim.lr=1e-3", "optim.weight_decay=0.01", "deepspeed.frozen_persistence_threshold=0",
    "deepspeed.timeout_minutes=2", "train.log_every=1",
]


# ---------------------------------------------------------------------------------------------------------- worker
def _register_test_methods():
    """Methods used only by these tests: a faulty MDLM (NaN / exception on one rank) and a toy distillation."""
    from ddistill.diffusion.schedules import sample_times
    from ddistill.methods import register
    from ddistill.methods.base import NetworkSpec, StepOutput, global_uniform
    from ddistill.methods.mdlm import MDLM, MDLMConfig

    @dataclass(kw_only=True)
    class FaultyConfig(MDLMConfig):
        nan_steps: list[int] = field(default_factory=list)
        nan_rank: int = 1
        error_step: int = -1
        error_rank: int = 1

    @register
    class Faulty(MDLM):
        name = "test_faulty"
        Config = FaultyConfig

        def step(self, nets, batch, ctx):
            if ctx.step == self.cfg.error_step and ctx.rank == self.cfg.error_rank:
                raise RuntimeError(f"injected failure on rank {ctx.rank}")
            out = super().step(nets, batch, ctx)
            if ctx.step in self.cfg.nan_steps and ctx.rank == self.cfg.nan_rank:
                out.losses["student"] = out.losses["student"] * float("nan")
            return out

    @dataclass(kw_only=True)
    class FinetuneConfig(MDLMConfig):
        pass

    @register
    class Finetune(MDLM):
        name = "test_finetune"
        Config = FinetuneConfig

        def networks(self):
            return {"student": NetworkSpec(role="trained", init="pretrained", ema=True),
                    "teacher": NetworkSpec(role="frozen", init="pretrained", model_overrides={"dropout": 0.0})}

    @dataclass(kw_only=True)
    class ToyDistillConfig:
        swap_step: int = 2

    @register
    class ToyDistill(MDLM):
        """student(x_t) matches the frozen teacher(x_t) (KL); teacher <- student EMA after `swap_step`."""

        name = "test_distill"
        Config = ToyDistillConfig

        def __init__(self, cfg, *, vocab_size, mask_id):
            super().__init__(MDLMConfig(), vocab_size=vocab_size, mask_id=mask_id)
            self.cfg_distill = cfg
            self.swaps = 0

        def networks(self):
            return {"student": NetworkSpec(role="trained", ema=True),
                    "teacher": NetworkSpec(role="frozen", init="copy:student")}

        def step(self, nets, batch, ctx):
            t = sample_times(batch.shape[0], global_batch=ctx.global_batch_size, offset=ctx.global_offset,
                             generator=ctx.generator, device=ctx.device)
            alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
            masked = global_uniform(ctx, batch.shape[0], (batch.shape[1],)) < (1 - alpha)[:, None]
            xt = torch.where(masked, torch.full_like(batch, self.mask_id), batch)
            teacher = torch.log_softmax(nets["teacher"](xt, sigma).float() + 0.5 * torch.nn.functional.one_hot(
                batch, self.vocab_size), -1)
            student = torch.log_softmax(nets["student"](xt, sigma).float(), -1)
            loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
            return StepOutput(losses={"student": loss}, metrics={}, num_tokens=batch.numel())

        def on_step_end(self, step, control):
            if step == self.cfg_distill.swap_step:
                control.copy_weights("teacher", "student", use_ema=True)
                self.swaps += 1
            return {"swaps": self.swaps}

        def state_dict(self):
            return {"swaps": self.swaps}

        def load_state_dict(self, state):
            self.swaps = state["swaps"]


@torch.no_grad()
def _load_params(model, state):
    params = dict(model.named_parameters())
    assert params.keys() == state.keys()
    for name, param in params.items():
        param.copy_(state[name])


def _blocks(num=64, seed=0):
    return np.random.default_rng(seed).integers(0, V - 1, size=(num, BLOCK)).astype(np.int32)


def _worker(mode: str, args: dict) -> None:
    _register_test_methods()
    from ddistill.engine import load_run_config, run_training
    from ddistill.engine.distributed import shutdown_distributed
    from ddistill.engine.networks import full_state
    from ddistill.engine.trainer import Trainer
    from ddistill.models.dit import build_model

    out = Path(args["result"])
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if mode == "lagged":  # LaggedAnyRank: only rank 1 raises its flag, only at call 3
        from ddistill.engine.distributed import LaggedAnyRank, init_distributed

        init_distributed(device="cpu")
        agree = LaggedAnyRank(torch.device("cpu"))
        seen = [agree(rank == 1 and call == 3) for call in range(7)]
        (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(seen))
        shutdown_distributed()
        return
    cfg = load_run_config(None, BASE + args["overrides"])
    if mode == "train":
        (out.parent / f"{out.name}.rank{rank}.pid").write_text(str(os.getpid()))
        summary = run_training(cfg, train_blocks=_blocks(), valid_blocks=_blocks(16, seed=5))
        assert summary["rank"] == rank
        (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(summary))
        return
    trainer = Trainer(cfg, train_blocks=_blocks())
    if mode == "equiv":  # two explicit global batches, this rank's rows
        ws, mb = trainer.dist.world_size, cfg.train.micro_batch_size
        for step in range(2):
            global_batch = torch.from_numpy(_blocks(cfg.train.global_batch_size, seed=100 + step)).long()
            micro = [global_batch[(k * ws + rank) * mb:(k * ws + rank + 1) * mb] for k in range(trainer.grad_accum)]
            metrics = trainer.train_step(micro)
        state = full_state(trainer.nets["student"])
        ema = full_state(trainer.nets["student"], use_ema=True)
        if rank == 0:
            torch.save({"raw": state, "ema": ema, "grad_norm": metrics["grad_norm/student"], "metrics": metrics,
                        "contiguous": trainer.nets["student"].engine.optimizer.contiguous_gradients}, out)
    elif mode == "init":  # init="pretrained" for a trained and a frozen network (dropout override on the latter)
        from ddistill.models.checkpoints import load_pretrained

        reference, _ = load_pretrained(cfg.init_from)
        want = {n: p.detach() for n, p in reference.named_parameters()}
        got_student = full_state(trainer.nets["student"])
        got_teacher = full_state(trainer.nets["teacher"])
        result = {
            "student_equal": all(torch.equal(got_student[n], want[n]) for n in want),
            "teacher_equal": all(torch.equal(got_teacher[n], want[n]) for n in want),
            "teacher_dropout": trainer.nets["teacher"].module.config.dropout,
            "student_dropout": trainer.nets["student"].module.config.dropout,
        }
        (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(result))
    elif mode == "zero3":
        teacher, student = trainer.nets["teacher"], trainer.nets["student"]
        params = list(teacher.module.parameters())
        local = sum(p.ds_tensor.numel() for p in params)
        total = sum(p.ds_numel for p in params)
        x = torch.from_numpy(_blocks(4, seed=7)[:, :BLOCK]).long()
        sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
        reference = build_model(student.module.config).eval()
        student_state = full_state(student)
        student_weight = student_state["output_layer.linear.weight"]
        _load_params(reference, student_state)
        with torch.no_grad():
            want = reference(x, sigma)
        got = teacher(x, sigma)
        with teacher.gathered_output() as (weight, bias):
            out_weight = weight.detach().clone()
        with teacher.resident():  # gathered once, hooks off: the same numbers, then partitioned again
            got_resident = [teacher(x, sigma), teacher(x, sigma)]
            with teacher.gathered_output() as (weight, bias):
                resident_weight = weight.detach().clone()
            gathered_inside = sum(p.numel() for p in params)
        partitioned_after = all(p.numel() == 0 and p.ds_status.name == "NOT_AVAILABLE" for p in params)
        for step in range(3):  # move the student away from the teacher, then swap in its EMA
            trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])
        inner = student.engine.optimizer.optimizer
        had_moments = any(float(v.abs().max()) > 0 for st in inner.state.values() for k, v in st.items()
                          if torch.is_tensor(v) and k != "step")
        ema = full_state(student, use_ema=True)
        trainer.copy_weights("teacher", "student", use_ema=True)
        _load_params(reference, ema)
        with torch.no_grad():
            want_after = reference(x, sigma)
        got_after = teacher(x, sigma)
        trainer.reset_optimizer("student")
        zeroed = all(float(v.abs().max()) == 0 for st in inner.state.values() for v in st.values()
                     if torch.is_tensor(v))
        result = {"had_moments": had_moments, "zeroed": zeroed, "local": local, "total": total, "diff": float((got - want).abs().max()),
                  "diff_after": float((got_after - want_after).abs().max()),
                  "moved": float((want_after - want).abs().max()),
                  "out_weight_diff": float((out_weight - student_weight).abs().max()),
                  "grad_enabled_params": sum(p.requires_grad for p in params),
                  "resident_diff": max(float((g - got).abs().max()) for g in got_resident),
                  "resident_weight_diff": float((resident_weight - out_weight).abs().max()),
                  "gathered_inside": gathered_inside, "partitioned_after": partitioned_after}
        (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


# ---------------------------------------------------------------------------------------------------------- helpers
def _env(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _launch(tmp_path, mode, overrides, result, nproc=2, timeout=180, check=True):
    args = tmp_path / f"{result.name}.args.json"
    args.write_text(json.dumps({"overrides": overrides, "result": str(result)}))
    if nproc == 1:
        cmd = [PY, __file__, mode, str(args)]
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__, mode,
               str(args)]
    proc = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{mode} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _summaries(result, nproc=2):
    return [json.loads((result.parent / f"{result.name}.rank{r}.json").read_text()) for r in range(nproc)]


def _final_state(out_dir: Path):
    """Raw student weights, EMA, frozen teacher weights and loss trajectory of a finished run."""
    from ddistill.engine.checkpoint import list_checkpoints

    step, path = list_checkpoints(out_dir / "checkpoints")[-1]
    raw = torch.load(path / "ds/student/state/mp_rank_00_model_states.pt", map_location="cpu",
                     weights_only=False)["module"]
    ema = torch.load(path / "ema/student.pt", map_location="cpu")["shadow"]
    frozen = {p.stem: torch.load(p, map_location="cpu") for p in (path / "frozen").glob("*.pt")}
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/student" in record:
            losses[record["step"]] = record["loss/student"]
    return step, raw, ema, frozen, losses


def _assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------------- tests
def test_zero2_two_ranks_equal_one_rank_with_doubled_micro_batch(tmp_path):
    common = ["method.name=mdlm", "model.dropout=0.0", "train.max_steps=10", "train.global_batch_size=8",
              f"train.out_dir={tmp_path / 'unused'}", "train.ema_decay=0.5", "optim.grad_clip=0.05"]
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    _launch(tmp_path, "equiv", common + ["train.micro_batch_size=2"], two, nproc=2)  # grad accumulation 2
    _launch(tmp_path, "equiv", common + ["train.micro_batch_size=8"], one, nproc=1)  # one micro-batch of 8
    a, b = torch.load(two), torch.load(one)
    assert a["grad_norm"] > 0.05  # clipping was active, so the global norm had to agree too
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * b["grad_norm"]
    for key in b["raw"]:
        torch.testing.assert_close(a["raw"][key], b["raw"][key], rtol=0, atol=2e-6)
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=2e-6)
    moved = max(float((b["raw"][k] - b["ema"][k]).abs().max()) for k in b["raw"])
    assert moved > 1e-4  # the steps changed the weights (EMA lags the raw weights)
    # Logged values are global: rank 0 reports the mean over both ranks' micro-batches, the tokens of both ranks.
    assert a["metrics"]["tokens"] == b["metrics"]["tokens"] == 8 * BLOCK
    for key in ("loss/student", "nll", "mask_rate"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-6, abs=0), key


def test_contiguous_gradient_buffer_changes_no_number_on_two_ranks(tmp_path):
    """`deepspeed.contiguous_gradients` only moves where ZeRO-2 keeps the gradients between the backward and the
    reduction: two ranks with and without the buffer end with the same weights, EMA and metrics, bit for bit."""
    common = ["method.name=mdlm", "model.dropout=0.0", "train.max_steps=4", "train.global_batch_size=8",
              "train.micro_batch_size=2", f"train.out_dir={tmp_path / 'unused'}", "train.ema_decay=0.5",
              "optim.grad_clip=0.05"]
    apart, buffered = tmp_path / "apart.pt", tmp_path / "buffered.pt"
    _launch(tmp_path, "equiv", common + ["deepspeed.contiguous_gradients=false"], apart, nproc=2)
    _launch(tmp_path, "equiv", common + ["deepspeed.contiguous_gradients=true"], buffered, nproc=2)
    a, b = torch.load(apart), torch.load(buffered)
    assert (a["contiguous"], b["contiguous"]) == (False, True)  # the key reached DeepSpeed's ZeRO-2 optimizer
    assert a["grad_norm"] == b["grad_norm"] and a["metrics"]["loss/student"] == b["metrics"]["loss/student"]
    for key in b["raw"]:
        assert torch.equal(a["raw"][key], b["raw"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_lagged_any_rank_agrees_one_call_late_on_every_rank(tmp_path):
    """The preemption flag's agreement: a flag raised on one rank at call 3 is seen by both ranks at call 4 exactly
    (one call late, no host sync of the call's own all-reduce); one rank sees its own flag at once."""
    from ddistill.engine.distributed import LaggedAnyRank

    result = tmp_path / "lagged"
    _launch(tmp_path, "lagged", [], result, nproc=2)
    seen = [json.loads((tmp_path / f"lagged.rank{r}.json").read_text()) for r in range(2)]
    assert seen[0] == seen[1] == [False, False, False, False, True, False, False]
    single = LaggedAnyRank(torch.device("cpu"))  # this process: no process group of several ranks
    assert [single(v) for v in (False, True, False)] == [False, True, False]


def test_zero3_teacher_is_partitioned_and_matches_unsharded_model(tmp_path):
    result = tmp_path / "zero3"
    _launch(tmp_path, "zero3", ["method.name=test_distill", "train.max_steps=10", "train.global_batch_size=4",
                                "train.micro_batch_size=2", f"train.out_dir={tmp_path / 'z3'}"], result)
    for r in _summaries(result):
        assert r["local"] <= r["total"] // 2 + 64 and r["local"] >= r["total"] // 2 - 64, r
        assert r["diff"] < 1e-5, r
        assert r["moved"] > 1e-4, r  # the swap had something to change
        assert r["diff_after"] < 1e-5, r
        assert r["grad_enabled_params"] == 0
        assert r["out_weight_diff"] == 0.0
        # Network.resident (deepspeed.frozen_gather=micro_batch, used by train_step above): every parameter whole
        # inside, outputs bit-equal to the per-module hook path, partitioned again on exit
        assert r["resident_diff"] == 0.0 and r["resident_weight_diff"] == 0.0, r
        assert r["gathered_inside"] == r["total"] and r["partitioned_after"], r
        assert r["had_moments"] and r["zeroed"]  # reset_optimizer cleared AdamW's moments and step counts


def test_pretrained_init_of_trained_and_frozen_networks(tmp_path):
    from ddistill.models.checkpoints import save_pretrained
    from ddistill.models.dit import build_model

    torch.manual_seed(5)
    model = build_model({"size": "test", "vocab_size": V, "length": BLOCK, "time_conditioning": False})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_pretrained(model, tmp_path / "init", flavor="mdlm")
    result = tmp_path / "init_run"
    _launch(tmp_path, "init", ["method.name=test_finetune", f"init_from={tmp_path / 'init'}", "train.max_steps=2",
                               "model.time_conditioning=false",
                               "train.global_batch_size=4", "train.micro_batch_size=2",
                               f"train.out_dir={tmp_path / 'o'}"], result)
    for r in _summaries(result):
        assert r == {"student_equal": True, "teacher_equal": True, "teacher_dropout": 0.0, "student_dropout": 0.1}


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deepspeed_launcher_and_srun_environment_start_the_same_run(tmp_path):
    """`deepspeed --num_gpus 2` (RANK etc. + an appended --local_rank) and bare srun-style SLURM_* variables."""
    common = ["method.name=mdlm", "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.eval_every=3"]
    args = tmp_path / "ds.args.json"
    args.write_text(json.dumps({"overrides": common + [f"train.out_dir={tmp_path / 'ds'}"],
                                "result": str(tmp_path / "ds_run")}))
    deepspeed_bin = Path(PY).parent / "deepspeed"
    proc = subprocess.run([str(deepspeed_bin), "--num_gpus", "2", f"--master_port={_free_port()}", __file__, "train",
                           str(args)], env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    args = tmp_path / "srun.args.json"
    args.write_text(json.dumps({"overrides": common + [f"train.out_dir={tmp_path / 'srun'}"],
                                "result": str(tmp_path / "srun_run")}))
    procs, job_id = [], str(_free_port())  # MASTER_PORT is derived from the job id, identical on both tasks
    for rank in range(2):
        env = dict(_env(tmp_path), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([PY, __file__, "train", str(args)], env=env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]
    ds, srun = _summaries(tmp_path / "ds_run"), _summaries(tmp_path / "srun_run")
    assert [s["world_size"] for s in ds + srun] == [2, 2, 2, 2]
    assert ds[0]["last_metrics"]["loss"] == srun[0]["last_metrics"]["loss"]  # same run, bit for bit
    assert "val/loss/student" in ds[0]["last_metrics"]
    _assert_same_tensors(_final_state(tmp_path / "ds")[1], _final_state(tmp_path / "srun")[1])


def test_interrupted_resume_equals_uninterrupted_and_truncated_checkpoint_is_refused(tmp_path):
    common = ["method.name=test_distill", "method.swap_step=3", "train.max_steps=6", "train.global_batch_size=8",
              "train.micro_batch_size=2", "train.ckpt_every=2", "train.keep_last=5"]
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    _launch(tmp_path, "train", common + [f"train.out_dir={full_dir}"], tmp_path / "full_run")
    # The ZeRO-3 teacher is written at the first checkpoint after each change (step 2: the initial copy; step 4:
    # swapped after step 3) and linked by the next ones (step 6), not gathered and written again.
    inode = {s: (full_dir / f"checkpoints/step_{s:08d}/frozen/teacher.pt").stat().st_ino for s in (2, 4, 6)}
    assert inode[2] != inode[4] == inode[6]
    _launch(tmp_path, "train", common + [f"train.out_dir={split_dir}", "train.stop_after_steps=3"],
            tmp_path / "split_a")
    (first,) = [s for s in _summaries(tmp_path / "split_a")[:1]]
    assert first["step"] == 3 and first["stop_reason"] == "stop_after_steps"
    # Damage the newest checkpoint (step 3): truncate one file. The resume must refuse it and use step 2.
    victim = split_dir / "checkpoints/step_00000003/ema/student.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    _launch(tmp_path, "train", common + [f"train.out_dir={split_dir}"], tmp_path / "split_b")
    for s in _summaries(tmp_path / "split_b"):
        assert s["resumed_from"].endswith("step_00000002"), s
        assert any("step_00000003" in p and "checksum" in p for p in s["damaged_checkpoints"]), s
        assert s["step"] == 6 and s["stop_reason"] == "max_steps"
    f_step, f_raw, f_ema, f_frozen, f_losses = _final_state(full_dir)
    s_step, s_raw, s_ema, s_frozen, s_losses = _final_state(split_dir)
    assert f_step == s_step == 6
    _assert_same_tensors(f_raw, s_raw)
    _assert_same_tensors(f_ema, s_ema)
    _assert_same_tensors(f_frozen["teacher"], s_frozen["teacher"])
    assert f_losses == s_losses  # the re-run steps 3..6 repeat the same losses exactly
    from ddistill.models.checkpoints import load_pretrained

    exported, _ = load_pretrained(full_dir / "export/student")  # the public HF layout holds the EMA weights
    _assert_same_tensors({n: p.detach() for n, p in exported.named_parameters()}, f_ema)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    common = ["method.name=mdlm", "train.max_steps=40", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.ckpt_every=3", "train.keep_last=2"]
    full_dir, kill_dir = tmp_path / "full", tmp_path / "kill"
    _launch(tmp_path, "train", common + [f"train.out_dir={full_dir}"], tmp_path / "full_run")
    args = tmp_path / "kill.args.json"
    args.write_text(json.dumps({"overrides": common + [f"train.out_dir={kill_dir}"], "result": str(tmp_path / "k")}))
    proc = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                             "train", str(args)], env=_env(tmp_path), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (kill_dir / "checkpoints/step_00000006").exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    _launch(tmp_path, "train", common + [f"train.out_dir={kill_dir}"], tmp_path / "resumed")
    for s in _summaries(tmp_path / "resumed"):
        assert s["resumed_from"] is not None and s["start_step"] >= 6 and s["step"] == 40
    f_step, f_raw, f_ema, _, f_losses = _final_state(full_dir)
    k_step, k_raw, k_ema, _, k_losses = _final_state(kill_dir)
    _assert_same_tensors(f_raw, k_raw)
    _assert_same_tensors(f_ema, k_ema)
    assert all(f_losses[s] == k_losses[s] for s in k_losses)


def test_preemption_signal_on_one_rank_checkpoints_all_and_resumes_exactly(tmp_path):
    common = ["method.name=mdlm", "train.max_steps=60", "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.ckpt_every=1000"]
    full_dir, pre_dir = tmp_path / "full", tmp_path / "pre"
    _launch(tmp_path, "train", common + [f"train.out_dir={full_dir}"], tmp_path / "full_run")
    args = tmp_path / "pre.args.json"
    result = tmp_path / "pre_run"
    args.write_text(json.dumps({"overrides": common + [f"train.out_dir={pre_dir}"], "result": str(result)}))
    proc = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
                             "train", str(args)], env=_env(tmp_path), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (pre_dir / "metrics.jsonl").exists() or len((pre_dir / "metrics.jsonl").read_text().split()) < 3:
            assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
            time.sleep(0.02)
        pid = int((result.parent / f"{result.name}.rank1.pid").read_text())
        os.kill(pid, signal.SIGUSR2)  # only rank 1 gets it (as with a per-task signal arriving late)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    first = _summaries(result)
    assert all(s["preempted"] and s["stop_reason"] == "preempted" for s in first)
    assert first[0]["step"] == first[1]["step"] < 60
    assert first[0]["latest_checkpoint"].endswith(f"step_{first[0]['step']:08d}")
    _launch(tmp_path, "train", common + [f"train.out_dir={pre_dir}"], tmp_path / "resumed")
    f_step, f_raw, f_ema, _, f_losses = _final_state(full_dir)
    p_step, p_raw, p_ema, _, p_losses = _final_state(pre_dir)
    assert f_step == p_step == 60
    _assert_same_tensors(f_raw, p_raw)
    _assert_same_tensors(f_ema, p_ema)
    assert f_losses == p_losses


def test_nan_on_one_rank_skips_on_both_then_stops_with_checkpoint(tmp_path):
    out_dir = tmp_path / "nan"
    common = ["method.name=test_faulty", "method.nan_steps=[1,3,4]", "train.max_steps=10",
              "train.global_batch_size=4", "train.micro_batch_size=2", "train.ckpt_every=100",
              "train.max_consecutive_nonfinite=2", f"train.out_dir={out_dir}"]
    _launch(tmp_path, "train", common, tmp_path / "nan_run", timeout=120)
    summaries = _summaries(tmp_path / "nan_run")
    for s in summaries:
        assert s["stop_reason"] == "nonfinite" and s["step"] == 5 and s["nonfinite_total"] == 3, s
    assert (out_dir / "checkpoints/step_00000005/MANIFEST.json").is_file()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0, 1.0, 1.0]
    # The skipped steps changed nothing: the checkpoint at step 5 holds the weights after step 3 (index 2).
    ema = torch.load(out_dir / "checkpoints/step_00000005/ema/student.pt")
    assert ema["num_updates"] == 2


def test_exception_on_one_rank_stops_all_ranks_without_hanging(tmp_path):
    common = ["method.name=test_faulty", "method.error_step=2", "train.max_steps=10", "train.global_batch_size=4",
              "train.micro_batch_size=2", f"train.out_dir={tmp_path / 'err'}"]
    start = time.time()
    proc = _launch(tmp_path, "train", common, tmp_path / "err_run", timeout=120, check=False)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert "RankFailure" in proc.stderr  # rank 0 raised too, instead of waiting in a collective
    assert time.time() - start < 100


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it first
    _worker(argv[0], json.loads(Path(argv[1]).read_text()))
    # gloo can abort in interpreter finalisation after all work is done (deepspeed.md P5); results are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
