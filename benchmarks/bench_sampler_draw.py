"""One sampler step taken apart: the draw (fused Triton kernels vs the float64 torch path) and the denoiser call.

At the issue-11 sampler shape (`small` DiT, batch 16 × 1024, V = 50258, bf16 logits as the padded head's slice):
    python benchmarks/bench_sampler_draw.py
A CPU smoke run (Triton interpreter, fp32 logits):
    python benchmarks/bench_sampler_draw.py --device cpu --size test --batch 2 --length 8 --vocab 101 --iters 1

Rows (median ms over --iters after one warm-up call; `GB/s` = bytes of the logits × the reads a fused kernel needs
(2 for the draws, 1 for the argmax) / time: the fused kernels' memory floor, a figure of merit for the torch rows):
  * `duo posterior draw` — every row: `draw_uniform_posterior` vs softmax(float64) → `uniform_posterior` →
    `sample_categorical` (the pre-fusion DUO step).
  * `x_theta draw, n rows` — MDLM: `draw_categorical` (mask column excluded) on n gathered rows vs the torch path.
  * `greedy tail` — `masked_argmax` vs argmax of the float64 softmax.
  * `denoiser, full logits` / `denoiser, n rows` — DiT forward with all logits or `rows=` positions only: eager
    (`block_kernels="torch"`), eager with the block's inference kernels (`"auto"`, ddistill.kernels.dit_block) and
    (with --compile) with compiled blocks.
Results are appended to benchmarks/results/sampler_draw.csv (device, torch, git) and sampler_draw.md regenerated.
"""

from __future__ import annotations

import argparse
import csv
import time

import torch
import triton

from harness import RESULTS, append_csv, git_revision

from ddistill.diffusion.samplers import sample_categorical
from ddistill.diffusion.uniform import uniform_posterior
from ddistill.kernels.sampling import draw_categorical, draw_uniform_posterior, masked_argmax
from ddistill.models import ModelConfig, build_model

FIELDS = ["device", "torch", "triton", "git", "rows", "vocab", "what", "impl", "ms", "gb_per_s"]


def timed(fn, device: torch.device, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def write_table() -> None:
    rows = list(csv.DictReader((RESULTS / "sampler_draw.csv").open()))
    lines = ["# One sampler step taken apart (benchmarks/bench_sampler_draw.py)", "",
             "Command: `python benchmarks/bench_sampler_draw.py --iters 5` (small DiT, batch 16 × 1024, bf16 logits).", "",
             "| device | torch / triton | git | rows × V | what | impl | ms | GB/s (logits reads: 2 per draw, 1 per argmax) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gbs = f"{float(r['gb_per_s']):.0f}" if r["gb_per_s"] else ""
        lines.append(f"| {r['device']} | {r['torch']} / {r['triton']} | {r['git']} | {r['rows']}×{r['vocab']} | {r['what']} | {r['impl']} | "
                     f"{float(r['ms']):.3f} | {gbs} |")
    (RESULTS / "sampler_draw.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50258)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the denoiser with compiled blocks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter has no bf16
    n, v = args.batch * args.length, args.vocab
    pad = -(-v // 64) * 64
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, pad, generator=gen, device=device) * 3).to(dtype)[:, :v]
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64)
    zt = torch.randint(0, v, (n,), generator=gen, device=device)
    a_t = torch.tensor(0.3, dtype=torch.float64, device=device)
    a_s = torch.tensor(0.35, dtype=torch.float64, device=device)
    mask_col = torch.tensor([v - 1], device=device)
    base = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__, git=git_revision(), vocab=v)
    rows_out = []

    def record(what: str, impl: str, rows: int, ms: float, passes: int = 2) -> None:
        """passes: reads of the logits a fused kernel needs (its memory floor); 0 for rows that are no draw."""
        gbs = passes * rows * v * logits.element_size() / (ms * 1e-3) / 1e9 if passes else ""
        rows_out.append(dict(base, rows=rows, what=what, impl=impl, ms=ms, gb_per_s=gbs))
        print(rows_out[-1], flush=True)

    def torch_posterior():
        probs = torch.softmax(logits.to(torch.float64), dim=-1)
        return sample_categorical(uniform_posterior(probs, zt, a_t, a_s), u)

    record("duo posterior draw", "fused", n, timed(lambda: draw_uniform_posterior(logits, zt, u, a_t, a_s), device,
                                                   args.iters))
    record("duo posterior draw", "torch", n, timed(torch_posterior, device, args.iters))
    for rows in sorted({n, max(1, n // 8), max(1, n // 256)}, reverse=True):
        sub, u_sub = logits[:rows], u[:rows]
        record(f"x_theta draw, {rows} rows", "fused",
               rows, timed(lambda: draw_categorical(sub, u_sub, exclude=v - 1), device, args.iters))
        record(f"x_theta draw, {rows} rows", "torch", rows, timed(
            lambda: sample_categorical(torch.softmax(sub.to(torch.float64).index_fill(-1, mask_col, float("-inf")),
                                                     dim=-1), u_sub), device, args.iters))
    record("greedy tail", "fused", n, timed(lambda: masked_argmax(logits), device, args.iters), passes=1)
    record("greedy tail", "torch", n, timed(lambda: torch.softmax(logits.to(torch.float64), -1).argmax(-1), device,
                                            args.iters), passes=1)
    del logits
    model = build_model(ModelConfig(size=args.size, vocab_size=v, length=args.length, time_conditioning=False,
                                    dropout=0.0)).to(device).eval()
    x = torch.randint(0, v, (args.batch, args.length), generator=gen, device=device)
    sigma = torch.zeros(args.batch, device=device)
    few = torch.arange(0, n, 256, device=device)
    for label in ("eager", "block kernels", "compiled") if args.compile else ("eager", "block kernels"):
        model.set_block_kernels("auto" if label == "block kernels" else "torch")
        if label == "compiled":
            model.compile_blocks()
        with torch.no_grad():
            record("denoiser, full logits", label, n, timed(lambda: model(x, sigma), device, args.iters), passes=0)
            record(f"denoiser, {few.numel()} rows", label, n, timed(lambda: model(x, sigma, rows=few), device,
                                                                  args.iters), passes=0)
    if not args.no_save:
        append_csv(rows_out, RESULTS / "sampler_draw.csv", FIELDS)
        write_table()


if __name__ == "__main__":
    main()
