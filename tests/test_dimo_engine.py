"""DiMO through the real engine on CPU (test-size DiT, DeepSpeed gloo, one rank, gradient accumulation 2): three
networks from one teacher checkpoint, per-network optimizers, frozen embeddings, two update phases, and a resume
that repeats the uninterrupted run bit for bit (all three networks, the EMA, the update counters)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ddistill.engine.networks import full_state
from ddistill.engine.run_config import run_config_from_dict
from ddistill.engine.trainer import Trainer
from ddistill.models.checkpoints import load_pretrained, save_pretrained
from ddistill.models.dit import ModelConfig, build_model

VOCAB, LENGTH = 37, 16
ROOT = Path(__file__).resolve().parents[1]


def teacher_dir(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=VOCAB, length=LENGTH, dropout=0.1, time_conditioning=False))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return save_pretrained(model, tmp_path / "teacher", flavor="mdlm")


def config(tmp_path, init_from, out="run", networks=None, **method):
    return run_config_from_dict(
        {
            "model": {"size": "test", "vocab_size": VOCAB, "length": LENGTH, "time_conditioning": False},
            "data": {"dataset": "classics", "block_size": LENGTH},
            "method": {"name": "dimo", "aux_steps": 2, **method},
            "optim": {"lr": 1e-3, "warmup_steps": 0},
            "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "out_dir": str(tmp_path / out),
                      "ckpt_every": 100, "keep_last": 5, "device": "cpu", "export_final": False, "ema_decay": 0.9},
            "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False},
            "init_from": str(init_from),
            "networks": networks or {"generator": {"optim": {"lr": 1e-3, "warmup_steps": 1}},
                                     "aux": {"optim": {"lr": 3e-3}}},
        }
    )


def blocks():
    return np.random.default_rng(0).integers(0, VOCAB - 1, size=(32, LENGTH), dtype=np.int64)


def step(trainer):
    return trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def states(trainer):
    return {"generator": full_state(trainer.nets["generator"]), "aux": full_state(trainer.nets["aux"]),
            "teacher": full_state(trainer.nets["teacher"]), "ema": full_state(trainer.nets["generator"], use_ema=True)}


@pytest.mark.slow
def test_dimo_networks_optimizers_frozen_embeddings_and_exact_resume(tmp_path):
    init = teacher_dir(tmp_path)
    pretrained = {n: p.detach().clone() for n, p in load_pretrained(init)[0].named_parameters()}
    cfg = config(tmp_path, init)
    first = Trainer(cfg, train_blocks=blocks())
    gen, aux, teacher = first.nets["generator"], first.nets["aux"], first.nets["teacher"]
    assert all(same(full_state(net), pretrained) for net in (gen, aux, teacher))
    assert gen.ema is not None and aux.ema is None and not teacher.trained

    # per-network optimizers: the method's Adam defaults, overridden per network from the config
    g_opt, a_opt = gen.engine.optimizer.optimizer, aux.engine.optimizer.optimizer
    assert type(g_opt) is torch.optim.Adam and type(a_opt) is torch.optim.Adam
    assert g_opt.defaults["eps"] == a_opt.defaults["eps"] == 1e-6 and g_opt.defaults["weight_decay"] == 0.0
    assert gen.engine.gradient_clipping() == 1.0 and aux.engine.gradient_clipping() == 0.0
    optimized = {id(p) for group in g_opt.param_groups for p in group["params"]}
    embedding = gen.module.vocab_embed.embedding
    assert id(embedding) not in optimized and not embedding.requires_grad

    metrics = [step(first)]
    assert metrics[0]["lr/generator"] == 1e-3 and metrics[0]["lr/aux"] == pytest.approx(3e-3 / 100)
    assert g_opt.param_groups[0]["lr"] == 1e-3 and a_opt.param_groups[0]["lr"] == pytest.approx(3e-5)
    assert first.updates == {"generator": 1, "aux": 2}  # aux_steps=2: two aux updates per generator update
    assert metrics[0]["loss/generator"] > 0 and metrics[0]["loss/aux"] > 0 and "dimo_loss_dm" in metrics[0]
    metrics.append(step(first))
    after = states(first)
    for name in ("generator", "aux"):
        assert torch.equal(after[name]["vocab_embed.embedding"], pretrained["vocab_embed.embedding"])  # frozen
        assert not torch.equal(after[name]["blocks.0.attn_qkv.weight"], pretrained["blocks.0.attn_qkv.weight"])
    assert same(after["teacher"], pretrained)
    first.save_checkpoint()
    rest = [step(first) for _ in range(2)]
    final = states(first)

    resumed = Trainer(cfg, train_blocks=blocks())
    assert resumed.step == 2 and resumed.updates == {"generator": 2, "aux": 4}
    assert all(same(states(resumed)[k], after[k]) for k in after)
    again = [step(resumed) for _ in range(2)]
    for a, b in zip(rest, again):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}  # every metric, exactly
    got = states(resumed)
    assert all(same(got[k], final[k]) for k in final)  # bitwise: all three networks and the EMA


@pytest.mark.slow
def test_dimo_export_is_the_generator_ema_and_eval_student(tmp_path):
    from ddistill.methods.dimo import DiMO, DiMOConfig

    init = teacher_dir(tmp_path)
    cfg = config(tmp_path, init, out="export_run", aux_steps=1)
    trainer = Trainer(cfg, train_blocks=blocks())
    step(trainer)
    out = trainer.export()
    exported, _ = load_pretrained(out)
    assert out.name == "generator"
    assert json.loads((out / "config.json").read_text())["model_type"] == "mdlm"  # the DiT of a masked model
    assert same({n: p.detach() for n, p in exported.named_parameters()},
                full_state(trainer.nets["generator"], use_ema=True))
    (student,) = DiMO(DiMOConfig(), vocab_size=VOCAB, mask_id=VOCAB - 1).eval_students()
    assert (student.network, student.sampler, student.step) == ("generator", "dimo", None)


def test_the_zero3_teacher_is_gathered_only_by_the_phase_that_reads_it(tmp_path, monkeypatch):
    """deepspeed.frozen_gather=micro_batch gathers a frozen ZeRO-3 network at its first lookup in a micro-batch: the
    teacher once per generator micro-batch, never in the aux phase (which does not read it), and partitioned again
    after each micro-batch."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from ddistill.engine import networks

    trainer = Trainer(config(tmp_path, teacher_dir(tmp_path)), train_blocks=blocks())
    teacher = trainer.nets["teacher"]
    assert trainer.cfg.deepspeed.frozen_gather == "micro_batch"
    assert all(hasattr(p, "ds_id") for p in teacher.engine.module.parameters())  # really partitioned
    phase, gathers = [None], []
    resident, method_step = networks.Network.resident, trainer.method.step

    def recording_resident(net):
        if net.name == "teacher":
            gathers.append(phase[0])
        return resident(net)

    def recording_step(nets, batch, ctx):
        phase[0] = ctx.phase
        return method_step(nets, batch, ctx)

    monkeypatch.setattr(networks.Network, "resident", recording_resident)
    monkeypatch.setattr(trainer.method, "step", recording_step)
    metrics = step(trainer)
    assert metrics["loss/generator"] >= 0 and metrics["loss/aux"] > 0
    assert gathers == ["generator"] * trainer.grad_accum  # 2 aux repeats x 2 micro-batches: none
    big = [p for p in teacher.engine.module.parameters() if not p.ds_persist]
    assert big and all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in big)


@pytest.mark.slow
@pytest.mark.parametrize("refine_frac", [0.0, 0.5])
def test_fused_generator_loss_matches_the_torch_path_through_the_engine(tmp_path, refine_frac):
    """loss_impl=triton and =chunked (hidden states + the fused kernel, ZeRO-3 teacher head gathered) =
    loss_impl=torch (logits of the masked rows): same losses and updates on the same draws (the first step has
    aux = teacher, so g = 0: the second step compares a non-trivial g); with refinement rows too, whose gradient
    rows are the redrawn masked positions only. The fused paths' aux CE_ε runs through the chunked label-smoothed
    kernel (hidden states), the torch path's through logits: same aux losses and gradient norms."""
    init = teacher_dir(tmp_path)
    runs = {}
    for impl in ("torch", "triton", "chunked"):
        trainer = Trainer(config(tmp_path, init, out=impl, aux_steps=1, loss_impl=impl, beta=0.3, dropout=0.0,
                                 refine_frac=refine_frac), train_blocks=blocks())
        runs[impl] = ([step(trainer) for _ in range(2)], full_state(trainer.nets["generator"]))
    m_torch, g_torch = runs["torch"]
    assert m_torch[1]["loss/generator"] > 1e-6
    pretrained = {n: p.detach() for n, p in load_pretrained(init)[0].named_parameters()}
    moved = max(float((g_torch[k] - pretrained[k]).abs().max()) for k in g_torch)
    assert moved > 1e-5
    for impl in ("triton", "chunked"):
        m_fused, g_fused = runs[impl]
        for a, b in zip(m_torch, m_fused):
            assert b["loss/generator"] == pytest.approx(a["loss/generator"], rel=1e-3, abs=1e-9)
            assert b["loss/aux"] == pytest.approx(a["loss/aux"], rel=1e-5)
            assert b["grad_norm/aux"] == pytest.approx(a["grad_norm/aux"], rel=1e-4)
            assert b["grad_norm/generator"] == pytest.approx(a["grad_norm/generator"], rel=1e-3, abs=1e-9)
        diff = max(float((g_torch[k] - g_fused[k]).abs().max()) for k in g_torch)
        assert diff < 3e-2 * moved, impl


# ------------------------------------------------------------------------------- 2 gloo ranks = 1 rank (subprocesses)
def _equiv_worker(args: dict) -> None:
    """Two explicit global batches through `train_step`; rank 0 saves every network's weights and the EMA."""
    import os

    from ddistill.engine.distributed import shutdown_distributed

    cfg = config(Path(args["tmp"]), args["init"], out=args["out"], networks={},
                 aux_steps=2, remask="cosine", dropout=0.0,  # dropout masks are drawn per rank, by design
                 refine_frac=0.5)  # refinement rows and ordinary rows: every draw is global
    cfg.train.micro_batch_size = args["micro"]
    trainer = Trainer(cfg, train_blocks=blocks())
    rank, ws, mb = trainer.dist.rank, trainer.dist.world_size, args["micro"]
    norms = []
    for _ in range(args.get("steps", 2)):
        batch = torch.from_numpy(blocks()[: cfg.train.global_batch_size])
        micro = [batch[(k * ws + rank) * mb:(k * ws + rank + 1) * mb] for k in range(trainer.grad_accum)]
        metrics = trainer.train_step(micro)
        norms.append((metrics["grad_norm/generator"], metrics["grad_norm/aux"]))
    result = {**states(trainer), "grad_norm": metrics["grad_norm/generator"], "norms": norms}
    if rank == 0:
        torch.save(result, args["result"])
    shutdown_distributed()
    os._exit(0)


def _launch(tmp_path, nproc, args):
    import subprocess
    import sys

    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, str(tmp_path / "args.json")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]


@pytest.mark.slow
def test_dimo_two_gloo_ranks_equal_one_rank_with_doubled_micro_batch(tmp_path):
    init = str(teacher_dir(tmp_path))
    _launch(tmp_path, 2, {"tmp": str(tmp_path), "init": init, "out": "two", "micro": 1, "result": str(tmp_path / "2.pt")})
    _launch(tmp_path, 1, {"tmp": str(tmp_path), "init": init, "out": "one", "micro": 2, "result": str(tmp_path / "1.pt")})
    two, one = torch.load(tmp_path / "2.pt"), torch.load(tmp_path / "1.pt")
    # Global gradient norms of every update agree to float noise (the method draws everything for the global batch
    # and normalises by global counts) ...
    for (g2, a2), (g1, a1) in zip(two["norms"], one["norms"]):
        assert g2 == pytest.approx(g1, rel=1e-4, abs=1e-9) and a2 == pytest.approx(a1, rel=1e-4)
    assert one["norms"][0][0] == 0.0 and one["norms"][1][0] > 0  # step 0: aux = teacher, so g = 0
    # ... and so do the weights, up to that noise amplified by Adam (eps 1e-6) in gradient entries far below eps:
    # a bound far below any real difference (a wrong normaliser or a different sample moves them by O(update)).
    for name in ("generator", "aux", "ema"):
        moved = max(float((one[name][k] - one["teacher"][k]).abs().max()) for k in one[name])
        diff = max(float((two[name][k] - one[name][k]).abs().max()) for k in one[name])
        assert moved > 1e-5 and diff < 3e-2 * moved, (name, diff, moved)


if __name__ == "__main__":
    import sys

    _equiv_worker(json.loads(Path(sys.argv[1]).read_text()))


@pytest.mark.slow
def test_aux_warmup_steps_hold_the_generator_while_the_aux_model_learns(tmp_path):
    init = teacher_dir(tmp_path)
    pretrained = {n: p.detach().clone() for n, p in load_pretrained(init)[0].named_parameters()}
    trainer = Trainer(config(tmp_path, init, out="warmup_run", aux_steps=1, aux_warmup_steps=2), train_blocks=blocks())
    for _ in range(2):
        metrics = step(trainer)
        assert "loss/generator" not in metrics and metrics["loss/aux"] > 0
    assert trainer.updates == {"generator": 0, "aux": 2}
    held = states(trainer)
    assert same(held["generator"], pretrained) and same(held["ema"], pretrained)  # neither stepped nor averaged
    assert not torch.equal(held["aux"]["blocks.0.attn_qkv.weight"], pretrained["blocks.0.attn_qkv.weight"])
    metrics = step(trainer)
    assert metrics["loss/generator"] > 0 and trainer.updates == {"generator": 1, "aux": 3}
    assert not torch.equal(full_state(trainer.nets["generator"])["blocks.0.attn_qkv.weight"],
                           pretrained["blocks.0.attn_qkv.weight"])
