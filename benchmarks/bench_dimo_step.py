"""One DiMO optimizer step (arXiv 2503.15457; generator update, then one auxiliary update) with all three networks:
the engine's DiMO (ddistill.engine Trainer + methods/dimo.py, DeepSpeed ZeRO-2 generator/aux, ZeRO-3 teacher)
against a straightforward PyTorch DiMO step that materialises every logits tensor (steps/s, tokens/s, peak memory).

    python benchmarks/bench_dimo_step.py                                    # DiT "small", batch 8 x 1024, one GPU
    python benchmarks/bench_dimo_step.py --impl baseline engine-torch engine-triton --batch 16
    python benchmarks/bench_dimo_step.py --device cpu --size test --vocab-size 1001 --batch 2 --length 32 \
        --steps 1 --warmup 0 --no-save                                     # CPU smoke run (Triton interpreter)

Both paths run the same math: x_init (60% [MASK] + uniform tokens, embedding noise σ = 0.1 scaled to the embedding
RMS) → generator logits (no SUBS) → x_θ ~ Categorical → x̃_t (arccos re-masking) → g = p_aux − p_teacher at the
masked rows → generator update (clip 1.0, EMA) → a fresh generator sample, re-masked → aux label-smoothed CE →
aux update; Adam lr 1e-5 eps 1e-6; bf16 autocast (the DiT's own) on CUDA; frozen input embeddings.

* ``baseline``: plain modules and torch.optim.Adam; full (B, L, V) logits of the generator (with graph), teacher and
  aux, full fp32 softmaxes, g and the surrogate ½‖z − sg(z − g)‖² on all positions (g = 0 where unmasked),
  ``torch.distributions.Categorical`` samples (the released image code).
* ``engine-torch`` / ``engine-triton``: ``Trainer.train_step_deferred`` (as ``fit`` runs it) with ``method.loss_impl``
  torch (teacher and aux logits of the masked rows only) or triton (the fused ``dimo_generator_loss``: no teacher/aux
  logits in memory; the aux CE by the chunked label-smoothed kernel; ``--set method.loss_impl=chunked`` for the
  chunked generator loss too).
One step = both phases; tokens/s counts the B·L generated tokens of the generator phase. Results are printed and
appended to benchmarks/results/dimo_step.csv (GPU, torch, triton, git revision).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_gaps import print_idle_gaps
from harness import RESULTS, append_csv, environment

from ddistill.models.dit import DiT, ModelConfig, resolve_model_config

R_INIT, SIGMA, LABEL_SMOOTHING = 0.6, 0.1, 0.1
FIELDS = ["timestamp", "gpu", "torch", "triton", "git_rev", "impl", "size", "batch", "length", "vocab",
          "steps_per_s", "tokens_per_s", "step_ms", "peak_mem_gb", "status"]  # fmt: skip


def teacher_model(args) -> DiT:
    torch.manual_seed(0)
    model = DiT(ModelConfig(size=args.size, vocab_size=args.vocab_size, time_conditioning=False, dropout=0.0,
                            length=args.length or None))
    with torch.no_grad():  # the DiT head is zero-initialised; give it a non-trivial distribution
        model.output_weight.normal_(0, 0.02)
    return model


# ------------------------------------------------------------------------------------------------------- baseline
def x_init(batch, length, vocab, mask_id, device):
    x = torch.randint(0, vocab - 1, (batch, length), device=device)
    k = round(R_INIT * length)
    masked = torch.rand(batch, length, device=device).argsort(-1).argsort(-1) < k
    return torch.where(masked, mask_id, x)


def remask(x, mask_id):
    batch, length = x.shape
    m = torch.arccos(torch.rand(batch, device=x.device)) / (math.pi / 2)
    k = (m * length).round().clamp(1, length)
    masked = torch.rand(batch, length, device=x.device).argsort(-1).argsort(-1) < k[:, None]
    return torch.where(masked, mask_id, x), masked


def noisy_generator_logits(gen, x):
    rms = gen.input_embedding_rms()
    noise = torch.randn(*x.shape, gen.config.hidden_size, device=x.device) * rms
    return gen(x, None, embed_noise=(SIGMA, noise))


def baseline_step(gen, aux, teacher, ema, opt_g, opt_a, batch, length):
    vocab = gen.vocab_size
    mask_id = vocab - 1
    device = next(gen.parameters()).device
    # generator update
    z = noisy_generator_logits(gen, x_init(batch, length, vocab, mask_id, device)).float()  # (B, L, V)
    z_sample = z.detach().clone()
    z_sample[..., mask_id] = float("-inf")
    x = torch.distributions.Categorical(logits=z_sample).sample()
    xt, masked = remask(x, mask_id)
    with torch.no_grad():
        zt = teacher(xt, None).float()
        za = aux(xt, None).float()
        zt[..., mask_id] = za[..., mask_id] = float("-inf")
        g = (torch.softmax(za, -1) - torch.softmax(zt, -1)) * masked[..., None]
    loss_g = 0.5 * (z - (z.detach() - g)).square().sum() / batch
    loss_g.backward()
    torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    with torch.no_grad():
        for e, p in zip(ema, gen.parameters()):
            e.lerp_(p.detach().float(), 1 - 0.9999)
    # aux update
    with torch.no_grad():
        z2 = noisy_generator_logits(gen, x_init(batch, length, vocab, mask_id, device)).float()
        z2[..., mask_id] = float("-inf")
        x2 = torch.distributions.Categorical(logits=z2).sample()
    xt2, masked2 = remask(x2, mask_id)
    logits_a = aux(xt2, None).float()[..., :mask_id]
    loss_a = F.cross_entropy(logits_a[masked2], x2[masked2], label_smoothing=LABEL_SMOOTHING)
    loss_a.backward()
    opt_a.step()
    opt_a.zero_grad(set_to_none=True)


def bench_baseline(args, device):
    teacher = teacher_model(args).to(device)
    gen, aux = copy.deepcopy(teacher).train(), copy.deepcopy(teacher).train()
    teacher.eval().requires_grad_(False)
    for net in (gen, aux):
        net.vocab_embed.requires_grad_(False)
    opt_g = torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    opt_a = torch.optim.Adam([p for p in aux.parameters() if p.requires_grad], lr=1e-5, eps=1e-6)
    ema = [p.detach().float().clone() for p in gen.parameters()]
    length = args.length or teacher.config.length
    return (profiled if args.profile else timed)(
        lambda: baseline_step(gen, aux, teacher, ema, opt_g, opt_a, args.batch, length), args, device)


# --------------------------------------------------------------------------------------------------------- engine
def bench_engine(args, device, loss_impl: str):
    import numpy as np

    from ddistill.config import apply_overrides
    from ddistill.engine.run_config import run_config_from_dict
    from ddistill.engine.trainer import Trainer
    from ddistill.models.checkpoints import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        model = teacher_model(args)
        save_pretrained(model, Path(tmp) / "teacher", flavor="mdlm")
        length = args.length or model.config.length
        del model
        cfg = run_config_from_dict(apply_overrides({
            "model": {"size": args.size, "vocab_size": args.vocab_size, "length": length, "dropout": 0.0,
                      "time_conditioning": False},
            "data": {"dataset": "classics", "block_size": length},
            "method": {"name": "dimo", "loss_impl": loss_impl},
            "train": {"max_steps": 10**6, "global_batch_size": args.batch, "micro_batch_size": args.batch,
                      "out_dir": str(Path(tmp) / "run"), "device": device.type, "export_final": False,
                      "compile": args.compile},
            "deepspeed": {"frozen_zero_stage": args.frozen_zero_stage},
            "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False},
            "init_from": str(Path(tmp) / "teacher"),
        }, args.set))
        blocks = np.zeros((args.batch, length), dtype=np.int64)
        trainer = Trainer(cfg, train_blocks=blocks)
        batch = torch.zeros(args.batch, length, dtype=torch.long)
        row = (profiled if args.profile else timed)(lambda: trainer.train_step_deferred([batch]), args, device)
        del trainer
    return row


# -------------------------------------------------------------------------------------------------------- harness
def timed(step, args, device) -> dict:
    cuda = device.type == "cuda"
    try:
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return dict(steps_per_s=1 / elapsed, step_ms=1e3 * elapsed, peak_mem_gb=peak, status="ok")
    except torch.OutOfMemoryError:
        return dict(status="OOM")
    finally:
        if cuda:
            torch.cuda.empty_cache()


def profiled(step, args, device) -> dict:
    """torch.profiler tables (top ops by device time, then by CPU time) of `args.steps` steps after warm-up, and the
    step's wall time against the summed kernel time (device-bound when they are close, host-bound otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(args.warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    if device.type == "cuda":
        from torch.autograd import DeviceType

        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # the kernels themselves, not their ops
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / args.steps
        print(f"[profile] {wall_ms:.1f} ms a step (under the profiler), kernels {kernel_ms:.1f} ms "
              f"({100 * kernel_ms / wall_ms:.0f}% of it)", flush=True)
    print(events.table(sort_by=sort, row_limit=30, max_name_column_width=60), flush=True)
    print(events.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60), flush=True)
    if device.type == "cuda":
        with tempfile.TemporaryDirectory(prefix="dimo_trace_") as tmp:
            print_idle_gaps(step, args.steps, Path(tmp))
    return dict(status="profiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--vocab-size", type=int, default=50258)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", nargs="+", choices=["baseline", "engine-torch", "engine-triton"],
                        default=["baseline", "engine-torch", "engine-triton"])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (Triton interpreter; use --size test)")
    parser.add_argument("--frozen-zero-stage", type=int, choices=[0, 3], default=3,
                        help="engine paths: the teacher as a ZeRO-3 inference engine (default) or replicated (0)")
    parser.add_argument("--compile", action="store_true",
                        help="engine paths: regional torch.compile of the DiT blocks (train.compile=true)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="engine paths: a dotted run-config override (repeatable), e.g. deepspeed.overlap_comm=false")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables (no timing rows)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_dimo_step.py: --device cuda but CUDA is not available (use --device cpu for a smoke run)")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("bench_dimo_step.py: --batch and --steps must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for impl in args.impl:
        result = bench_baseline(args, device) if impl == "baseline" else bench_engine(args, device, impl[7:])
        length = args.length or resolve_model_config(ModelConfig(size=args.size)).length
        if result.get("status") == "ok":
            result["tokens_per_s"] = result["steps_per_s"] * args.batch * length
        name = impl if impl == "baseline" or args.frozen_zero_stage == 3 else f"{impl}-z{args.frozen_zero_stage}"
        name += "+compile" if args.compile and impl != "baseline" else ""
        name += "".join(f" {o}" for o in args.set) if impl != "baseline" else ""
        row = {"timestamp": stamp, **env, "impl": name, "size": args.size, "batch": args.batch, "length": length,
               "vocab": args.vocab_size, **result}
        rows.append(row)
        print({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    if not args.no_save and not args.profile:
        append_csv(rows, RESULTS / "dimo_step.csv", FIELDS)


if __name__ == "__main__":
    main()
