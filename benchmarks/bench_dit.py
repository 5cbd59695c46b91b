"""DiT training and sampling throughput: forward+backward tokens/s and sampler tokens/s.

One GPU (the issue's reference point):
    python benchmarks/bench_dit.py --size small --batch 32 --length 1024
A CPU smoke run with a tiny config:
    python benchmarks/bench_dit.py --size test --batch 2 --length 64 --vocab 1001 --sampler-steps 4 --device cpu

Forward+backward: the MDLM loss (masking at stratified times, SUBS, weight α'/(1−α)) on random tokens, the model's
default autocast (bf16 on CUDA), one AdamW step excluded (the optimizer is not part of the DiT). Sampler: MDLM
ancestral with caching (not time-conditioned) and DUO ancestral with the greedy tail (time-conditioned), float64
categorical sampling; tokens/s = generated tokens / wall time of one call after a 2-step warm-up call, NFE
reported. `--draws` picks the samplers' draw path (fused: the Triton float64 draw kernels of
ddistill.kernels.sampling; torch: the float64 reference path; auto: fused on CUDA), `--compile off on` also times
the DiT with its blocks compiled (`DiT.compile_blocks`; the compile happens in the warm-up call), `--block-kernels
auto torch` times eager blocks with and without their inference kernels (ddistill.kernels.dit_block; CUDA only).
Rows are labelled "sample <kind> [<draw>(, compiled)(, block kernels)]".

The issue-11 sampler goal, on one H200 (ratios to the reference's 0.44 / 1.70 / 12.83 s for MDLM and
0.70 / 2.70 / 21.37 s for DUO at 8 / 32 / 256 steps, `small`, batch 16 × 1024, are printed and tabled):
    python benchmarks/bench_dit.py --size small --batch 16 --length 1024 --no-train --samplers mdlm,duo \
        --sampler-steps 8 32 256 --draws fused torch --compile off on

Each row is appended to benchmarks/results/dit.csv (keyed by device, torch version and git revision) as soon as it
is measured, and benchmarks/results/dit.md is regenerated from it at the end.
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

# Wall seconds of the reference code's samplers (DUO ch-1, float64) on one H200, `small`, batch 16 × 1024 (issue 11).
REFERENCE_SECONDS = {("mdlm", 8): 0.44, ("mdlm", 32): 1.70, ("mdlm", 256): 12.83,
                     ("duo", 8): 0.70, ("duo", 32): 2.70, ("duo", 256): 21.37}
REFERENCE_SHAPE = ("small", 16, 1024)

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


def bench_sampler(model, kind: str, batch: int, length: int, vocab: int, steps: int, device, draw: str = "auto",
                  warmup: bool = True) -> tuple[float, int, float]:
    """Wall ms of one sampler call (after a 2-step warm-up call that pays cuBLAS/SDPA/allocator start-up), NFE,
    peak GB."""
    schedule = LogLinearSchedule()

    def run(num_steps: int):
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            if kind == "mdlm":
                return sample_mdlm(model, batch_size=batch, length=length, num_steps=num_steps, mask_id=vocab - 1,
                                   vocab_size=vocab, schedule=schedule, cached=True, generator=gen, device=device,
                                   draw=draw, row_logits=True)
            return sample_duo(model, batch_size=batch, length=length, num_steps=num_steps, vocab_size=vocab,
                              schedule=schedule, generator=gen, device=device, draw=draw)

    if warmup:
        run(2)
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    out = run(steps)
    sync(device)
    return (time.perf_counter() - start) * 1e3, out.nfe, peak_gb(device)


def reference_ratio(row: dict) -> float | None:
    """Reference seconds / measured seconds for a sampler row at the reference shape, else None."""
    kind = row["what"].split()[1] if row["what"].startswith("sample ") else None
    ref = REFERENCE_SECONDS.get((kind, int(row["steps"]))) if kind and row["steps"] != "" else None
    if ref is None or (row["size"], int(row["batch"]), int(row["length"])) != REFERENCE_SHAPE:
        return None
    return ref / (float(row["ms"]) / 1e3)


def write_table() -> Path:
    rows = list(csv.DictReader((RESULTS / "dit.csv").open()))
    lines = ["# DiT throughput (benchmarks/bench_dit.py)", "",
             "× ref: the reference code's sampler seconds on one H200 (issue 11) over ours, at small, 16×1024.", "",
             "| device | git | size | batch×length | what | steps | NFE | ms | tokens/s | peak GB | × ref |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = reference_ratio(r)
        lines.append(f"| {r['device']} | {r['git']} | {r['size']} ({int(r['params']) / 1e6:.1f}M) | "
                     f"{r['batch']}×{r['length']} | {r['what']} | {r['steps']} | {r['nfe']} | {float(r['ms']):.1f} | "
                     f"{float(r['tokens_per_s']):,.0f} | {float(r['peak_mem_gb']):.2f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
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
    p.add_argument("--samplers", nargs="+", default=["mdlm,duo"], help="mdlm and/or duo (space or comma separated)")
    p.add_argument("--no-train", action="store_true", help="time the samplers only")
    p.add_argument("--draws", nargs="+", choices=("auto", "fused", "torch"), default=["auto"],
                   help="the samplers' draw paths to time (ddistill.diffusion.samplers, `draw`)")
    p.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off"],
                   help="time the samplers with eager and/or compiled DiT blocks (off runs first)")
    p.add_argument("--block-kernels", nargs="+", choices=("auto", "torch"), default=["auto"],
                   help="eager rows: with the block's inference kernels (auto, on CUDA) and/or the torch ops")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="print only; do not append to benchmarks/results")
    args = p.parse_args(argv)
    samplers = {name for item in args.samplers for name in item.split(",") if name}
    if not samplers <= {"mdlm", "duo"}:
        p.error(f"--samplers {' '.join(args.samplers)}: expected mdlm and/or duo")
    device = torch.device(args.device)
    torch.manual_seed(0)
    saved = []

    def record(row: dict) -> None:
        ratio = reference_ratio({k: str(v) for k, v in row.items()})
        print({**row, **({} if ratio is None else {"x_reference": round(ratio, 3)})}, flush=True)
        if not args.no_save:  # at once: a run cut short by a time limit keeps what it measured
            append_csv([row], RESULTS / "dit.csv", FIELDS)
        saved.append(row)

    base = dict(device=device_name(device), torch=torch.__version__, git=git_revision(), size=args.size,
                length=args.length)
    for kind, time_cond in (("mdlm", False), ("duo", True)):
        if kind not in samplers:
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
            record(dict(base, params=params, batch=args.batch, what="train fwd+bwd (MDLM loss)", steps="",
                        nfe="", ms=ms, tokens_per_s=args.batch * args.length / ms * 1e3, peak_mem_gb=mem))
        model.eval()
        sb = args.sampler_batch or args.batch
        variants = [("off", blocks) for blocks in args.block_kernels] if "off" in args.compile else []
        variants += [("on", "torch")] if "on" in args.compile else []  # compiled blocks never use the kernels
        for compiled, blocks in variants:
            model.set_block_kernels(blocks)
            if compiled == "on":
                model.compile_blocks()
            block_kernels = compiled == "off" and blocks == "auto" and device.type == "cuda"
            for draw in args.draws:
                label = draw if draw != "auto" else ("fused" if device.type == "cuda" else "torch")
                what = (f"sample {kind} [{label}{', compiled' if compiled == 'on' else ''}"
                        f"{', block kernels' if block_kernels else ''}]")
                for steps in args.sampler_steps:
                    try:
                        ms, nfe, mem = bench_sampler(model, kind, sb, args.length, args.vocab, steps, device, draw)
                    except torch.OutOfMemoryError:
                        print(f"{what} at batch {sb}: out of memory", flush=True)
                        torch.cuda.empty_cache()
                        continue
                    record(dict(base, params=params, batch=sb, what=what, steps=steps, nfe=nfe, ms=ms,
                                tokens_per_s=sb * args.length / ms * 1e3, peak_mem_gb=mem))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.no_save or not saved:
        return
    print(f"wrote {RESULTS / 'dit.csv'} and {write_table()}", file=sys.stderr)


if __name__ == "__main__":
    main()
