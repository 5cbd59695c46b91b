"""DeepSpeed ZeRO-2's global gradient norm, its own loop against ddistill's one multi-tensor call, in one process.

    python benchmarks/bench_zero_norm.py --rows mdlm_tiny,mdlm_small                 # one GPU
    python benchmarks/bench_zero_norm.py --device cpu --rows mdlm_test --blocks 2 --steps 2 --no-save   # CPU smoke

`networks._grad_norm_direct` replaces DeepSpeed's `get_grad_norm_direct` on the trained networks' ZeRO-1/2 optimizers:
one `torch._foreach_norm(grads, 2, dtype=float64)` instead of a float64 copy and a `vector_norm` launch per gradient.
Separate processes of the same training step differ by more than this change on host-bound rows (`bench_engine.py`'s
`mdlm_tiny` spread 44–59 ms a step across processes of one tree on one H200), so this script measures both variants
in one process, on the same trainer:

* the norm call alone, on gradients shaped like the row's trained network (views into one flat random buffer, as
  DeepSpeed's ZeRO-2 partition holds them): ms per call from the host's view and with the device's work included;
* the training step (`bench_engine.py`'s rows and variants, classics corpus): after a warm-up, `--blocks` pairs of
  blocks of `--steps` optimizer steps, alternating DeepSpeed's function and ours (A B A B …; every block starts and
  ends synchronised), ms per step as the median over the blocks of each variant.

Rows go to results/zero_norm.csv (card, versions, git revision) and results/zero_norm.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

from bench_engine import ROWS, add_row_arguments, engine_args, optimizer_step, parse_rows, row_config
from harness import RESULTS, ROOT, append_csv, environment, synchronize

CSV_PATH = RESULTS / "zero_norm.csv"
MD_PATH = RESULTS / "zero_norm.md"
FIELDS = ["timestamp", "gpu", "torch", "triton", "git_rev", "row", "variant", "what", "deepspeed_ms", "ddistill_ms",
          "ratio", "repeats", "command"]  # fmt: skip


def time_norm_call(optimizer, device, iters: int) -> tuple[float, float, float, float, float]:
    """(DeepSpeed host ms, DeepSpeed ms with the device's work, ours host ms, ours ms with the device's work, the
    relative difference of the two norms: 0 on CPU, float64 rounding of the per-gradient norms on CUDA)."""
    import torch

    params = list(optimizer.params_in_partition[0])
    flat = torch.randn(sum(p.numel() for p in params), device=device) * 1e-3
    grads, offset = [], 0
    for p in params:
        grads.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    out, norms = [], []
    for fn in (lambda: type(optimizer).get_grad_norm_direct(optimizer, grads, params),
               lambda: optimizer.get_grad_norm_direct(grads, params)):
        norms.append(fn().double())
        for _ in range(2):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        host = (time.perf_counter() - start) / iters
        synchronize(device)
        out += [1e3 * host, 1e3 * (time.perf_counter() - start) / iters]
    return (*out, float((norms[1] - norms[0]).abs() / norms[0]))


def time_steps(trainer, optimizers, blocks: int, steps: int) -> tuple[list[float], list[float]]:
    """ms per step of each block, alternating DeepSpeed's norm (A) and ours (B) on every trained network."""
    ours = [opt.get_grad_norm_direct for opt in optimizers]
    times: dict[str, list[float]] = {"deepspeed": [], "ddistill": []}

    for _ in range(5):
        optimizer_step(trainer)
    for _ in range(blocks):
        for variant in ("deepspeed", "ddistill"):
            for opt, norm in zip(optimizers, ours):
                if variant == "deepspeed":
                    del opt.get_grad_norm_direct  # back to the class's function: DeepSpeed's
                else:
                    opt.get_grad_norm_direct = norm
            synchronize(trainer.device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer_step(trainer)
            synchronize(trainer.device)
            times[variant].append(1e3 * (time.perf_counter() - start) / steps)
    for opt, norm in zip(optimizers, ours):
        opt.get_grad_norm_direct = norm
    return times["deepspeed"], times["ddistill"]


def bench_row(name: str, variant: str, args, work: Path) -> list[dict]:
    from ddistill.engine.run_config import load_run_config
    from ddistill.engine.trainer import Trainer

    row = ROWS[name]
    _, extra = row_config(name, variant, args.set, work)
    overrides = engine_args(row, variant, extra, 10**6, work / name, args.device)[1:]
    trainer = Trainer(load_run_config(ROOT / row["config"], overrides))
    optimizers = [net.engine.optimizer for net in trainer.nets.values() if net.trained]
    if not all("get_grad_norm_direct" in vars(opt) for opt in optimizers):
        raise SystemExit(f"{name}: a trained network's optimizer has no ddistill norm installed "
                         f"({[type(opt).__name__ for opt in optimizers]}); nothing to compare")
    ds_host, ds_all, our_host, our_all, rel_diff = time_norm_call(optimizers[0], trainer.device, args.norm_iters)
    ds_steps, our_steps = time_steps(trainer, optimizers, args.blocks, args.steps)
    ds_step, our_step = statistics.median(ds_steps), statistics.median(our_steps)
    print(f"{name} / {variant}: norms' relative difference {rel_diff:.3g}; "
          f"norm call, host {ds_host:.3f} -> {our_host:.3f} ms, with the device's work "
          f"{ds_all:.3f} -> {our_all:.3f} ms ({ds_all / our_all:.2f}x); step {ds_step:.2f} -> {our_step:.2f} ms "
          f"({ds_step / our_step:.3f}x; blocks A {['%.2f' % t for t in ds_steps]}, B {['%.2f' % t for t in our_steps]})",
          flush=True)
    env = environment()
    command = f"python benchmarks/bench_zero_norm.py --rows {name} --variants {variant} --blocks {args.blocks} " \
              f"--steps {args.steps}"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = dict(env, timestamp=stamp, row=name, variant=variant, command=command)
    return [dict(base, what="norm call, host", deepspeed_ms=ds_host, ddistill_ms=our_host, ratio=ds_host / our_host,
                 repeats=args.norm_iters),
            dict(base, what="norm call, with the device's work", deepspeed_ms=ds_all, ddistill_ms=our_all,
                 ratio=ds_all / our_all, repeats=args.norm_iters),
            dict(base, what="training step (median of blocks)", deepspeed_ms=ds_step, ddistill_ms=our_step,
                 ratio=ds_step / our_step, repeats=f"{args.blocks}x{args.steps}")]


def write_markdown() -> None:
    import csv

    with CSV_PATH.open() as fh:
        rows = list(csv.DictReader(fh))
    lines = ["# DeepSpeed ZeRO-2's gradient norm: its loop vs one multi-tensor call (benchmarks/bench_zero_norm.py)",
             "", "Both variants in one process on the same trainer; ms (ratio = DeepSpeed / ddistill).", "",
             "| card | git | row | variant | what | DeepSpeed ms | ddistill ms | ratio | repeats |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['git_rev']} | {r['row']} | {r['variant']} | {r['what']} | "
                     f"{float(r['deepspeed_ms']):.3f} | {float(r['ddistill_ms']):.3f} | {float(r['ratio']):.3f} | "
                     f"{r['repeats']} |")  # fmt: skip
    MD_PATH.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(parser, rows="mdlm_tiny,mdlm_small", variants="fused")
    parser.add_argument("--blocks", type=int, default=4, help="pairs of (DeepSpeed, ddistill) blocks")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--norm-iters", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    rows, variants = parse_rows(parser, args)
    for name, value in (("--blocks", args.blocks), ("--steps", args.steps), ("--norm-iters", args.norm_iters)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            for variant in variants:
                results += bench_row(name, variant, args, Path(tmp))
    if not args.no_save:
        append_csv(results, CSV_PATH, FIELDS)
        write_markdown()


if __name__ == "__main__":
    main()
