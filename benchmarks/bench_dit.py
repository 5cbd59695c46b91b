"""DiT training and sampling throughput: forward+backward tokens/s and sampler tokens/s.

One GPU (the issue's reference point):
    python benchmarks/bench_dit.py --size small --batch 32 --length 1024
A CPU smoke run with a tiny config:
    python benchmarks/bench_dit.py --size test --batch 2 --length 64 --vocab 1001 --sampler-steps 4 --device cpu

Forward+backward: the MDLM loss (masking at stratified times, SUBS, weight α'/(1−α)) on random tokens, the model's
default autocast (bf16 on CUDA), one AdamW step excluded (the optimizer is not part of the DiT). Sampler: MDLM
ancestral with caching (not time-conditioned) and DUO ancestral with the greedy tail (time-conditioned), float64
categorical sampling; tokens/s = generated tokens / wall time of one call after a 2-step warm-up call, NFE
reported. Results are appended to
benchmarks/results/dit.csv (keyed by device, torch version and git revision) and benchmarks/results/dit.md is
regenerated from it.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from harness import RESULTS, append_csv, git_revision

from ddistill.diffusion import LogLinearSchedule, mask_tokens, mdlm_loss, sample_duo, sample_mdlm, sample_times
from ddistill.models import ModelConfig, build_model

FIELDS = ["device", "torch", "git", "size", "params", "batch", "length", "what", "steps", "nfe", "ms", "tokens_per_s",
          "peak_mem_gb"]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def bench_train(model, batch: int, length: int, vocab: int, device, iters: int, warmup: int) -> tuple[float, float]:
    """Median ms of forward+backward of the MDLM loss, and peak memory in GB."""
    schedule = LogLinearSchedule()
    mask_id = vocab - 1
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, vocab - 1, (batch, length), device=device, generator=gen)
    times = []
    reset_peak(device)
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        t = sample_times(batch, global_batch=batch, offset=0, generator=gen, device=device)
        xt = mask_tokens(x0, schedule.alpha(t), mask_id, gen)
        logits = model(xt, schedule.sigma(t).float())
        loss = mdlm_loss(logits, x0, xt, schedule.alpha(t), schedule.alpha_prime(t), mask_id)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], peak_gb(device)


def bench_sampler(model, kind: str, batch: int, length: int, vocab: int, steps: int, device,
                  warmup: bool = True) -> tuple[float, int, float]:
    """Wall ms of one sampler call (after a 2-step warm-up call that pays cuBLAS/SDPA/allocator start-up), NFE,
    peak GB."""
    schedule = LogLinearSchedule()

    def run(num_steps: int):
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            if kind == "mdlm":
                return sample_mdlm(model, batch_size=batch, length=length, num_steps=num_steps, mask_id=vocab - 1,
                                   vocab_size=vocab, schedule=schedule, cached=True, generator=gen, device=device)
            return sample_duo(model, batch_size=batch, length=length, num_steps=num_steps, vocab_size=vocab,
                              schedule=schedule, generator=gen, device=device)

    if warmup:
        run(2)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    out = run(steps)
    sync(device)
    return (time.perf_counter() - start) * 1e3, out.nfe, peak_gb(device)


def write_table() -> Path:
    rows = list(csv.DictReader((RESULTS / "dit.csv").open()))
    lines = ["# DiT throughput (benchmarks/bench_dit.py)", "",
             "| device | git | size | batch×length | what | steps | NFE | ms | tokens/s | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['git']} | {r['size']} ({int(r['params']) / 1e6:.1f}M) | "
                     f"{r['batch']}×{r['length']} | {r['what']} | {r['steps']} | {r['nfe']} | {float(r['ms']):.1f} | "
                     f"{float(r['tokens_per_s']):,.0f} | {float(r['peak_mem_gb']):.2f} |")
    out = RESULTS / "dit.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sampler-batch", type=int, default=None, help="batch for sampling (default: --batch)")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sampler-steps", type=int, nargs="+", default=[16, 128])
    p.add_argument("--samplers", default="mdlm,duo", help="comma list of mdlm, duo")
    p.add_argument("--no-train", action="store_true", help="time the samplers only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    base = dict(device=device_name(device), torch=torch.__version__, git=git_revision(), size=args.size,
                length=args.length)
    for kind, time_cond in (("mdlm", False), ("duo", True)):
        if kind not in args.samplers.split(","):
            continue
        model = build_model(ModelConfig(size=args.size, vocab_size=args.vocab, length=args.length,
                                        time_conditioning=time_cond, dropout=0.0)).to(device)
        with torch.no_grad():  # zero-initialised output layers would make sampling trivially uniform
            for prm in model.parameters():
                if prm.dim() >= 2 and prm.abs().sum() == 0:
                    prm.normal_(0, 0.02)
        params = model.num_parameters()
        if kind == "mdlm" and not args.no_train:
            ms, mem = bench_train(model, args.batch, args.length, args.vocab, device, args.iters, args.warmup)
            rows.append(dict(base, params=params, batch=args.batch, what="train fwd+bwd (MDLM loss)", steps="",
                             nfe="", ms=ms, tokens_per_s=args.batch * args.length / ms * 1e3, peak_mem_gb=mem))
            print(rows[-1], flush=True)
        model.eval()
        sb = args.sampler_batch or args.batch
        for steps in args.sampler_steps:
            try:
                ms, nfe, mem = bench_sampler(model, kind, sb, args.length, args.vocab, steps, device)
            except torch.OutOfMemoryError:
                print(f"{kind} sampler at batch {sb}: out of memory (float64 posterior over B×L×V)", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(dict(base, params=params, batch=sb, what=f"sample {kind}", steps=steps, nfe=nfe, ms=ms,
                             tokens_per_s=sb * args.length / ms * 1e3, peak_mem_gb=mem))
            print(rows[-1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.no_save:
        return
    append_csv(rows, RESULTS / "dit.csv", FIELDS)
    print(f"wrote {RESULTS / 'dit.csv'} and {write_table()}", file=sys.stderr)


if __name__ == "__main__":
    main()
