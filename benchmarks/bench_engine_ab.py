"""Run-config overrides A/B-tested on the training step in ONE process: one trainer per arm, alternating blocks.

    python benchmarks/bench_engine_ab.py --rows mdlm_small --variants chunked+compile \\
        --arm buffered deepspeed.contiguous_gradients=true --arm apart deepspeed.contiguous_gradients=false
    python benchmarks/bench_engine_ab.py --rows mdlm_small --arm a --arm b --replicas 2   # the noise floor: A = B
    python benchmarks/bench_engine_ab.py --device cpu --rows mdlm_test --variants baseline --blocks 1 --steps 1 \\
        --arm a --arm b train.seed=1 --no-save                                                   # CPU smoke

Separate processes of one tree differ by more than a few-percent change (`bench_engine.py`'s `mdlm_small` step
spread 78.4–84.5 ms across processes on one H200), so every arm here is a `Trainer` of the same row
(`bench_engine.py`'s rows and variants, classics corpus) built side by side in one process, each with its own extra
overrides. After a warm-up of every arm, `--blocks` rounds run `--steps` optimizer steps of each arm in turn
(A B … A B …; every block starts and ends synchronised). The figure of an arm is the median ms per step over its
blocks; its ratio is the first arm's median over its own. On CUDA each arm's kernels are then timed over 3 steps
(`torch.profiler`, CUDA activity only: the sum of kernel durations a step, and the kernel count), so that
ms per step − kernel ms is the time the device waited for the host.

Trainers of one config in one process need not run equally fast: on one H200, two arms with identical settings
(`--arm a --arm b train.seed=1`, mdlm_small) ran 82.7 and 75.5 ms a step in one call and within 1% of each other in
another, with equal kernel time (the difference is host time). `--replicas K` therefore builds K trainers per arm
(identical work: same config and seed, own output directories), interleaved in build and run order
(A1 B1 A2 B2 …); an arm's figure is the median over all its replicas' blocks, and each replica's own median is
printed and saved, so that a ratio can be read against the spread between replicas of one arm.

Every arm's config is loaded before the first trainer is built (a bad override fails before any work). Rows go to
results/engine_ab.csv (card, versions, git revision, command) and results/engine_ab.md.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_engine import ROWS, add_row_arguments, engine_args, optimizer_step, parse_rows, row_config
from harness import RESULTS, ROOT, append_csv, environment, synchronize

CSV_PATH = RESULTS / "engine_ab.csv"
MD_PATH = RESULTS / "engine_ab.md"
FIELDS = ["timestamp", "gpu", "torch", "triton", "git_rev", "row", "variant", "arm", "overrides", "ms_per_step",
          "tokens_per_s", "kernel_ms", "kernels_per_step", "ratio", "blocks_ms", "command", "replica_ms"]  # fmt: skip
PROFILED_STEPS = 3


def kernel_time(trainer) -> tuple[float, float]:
    """(kernel ms a step, kernels a step) over PROFILED_STEPS steps: the sum of the CUDA kernels' durations."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    synchronize(trainer.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            optimizer_step(trainer)
        synchronize(trainer.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in kernels) / 1e3 / PROFILED_STEPS, len(kernels) / PROFILED_STEPS


def arm_configs(name: str, variant: str, arms: list[tuple[str, list[str]]], args, work: Path,
                replicas: int = 1) -> dict:
    """{(label, replica): run config} of one row and variant, replica-major (A1 B1 A2 B2 …), each replica with its
    own output directory (raises ConfigError naming a bad override)."""
    from ddistill.engine.run_config import load_run_config

    row, configs = ROWS[name], {}
    extras = {label: row_config(name, variant, [*args.set, *overrides], work)[1] for label, overrides in arms}
    for replica in range(replicas):
        for label, _ in arms:
            out = work / f"{name}-{variant}-{label}-{replica}"
            argv = engine_args(row, variant, extras[label], 10**6, out, args.device)[1:]
            configs[label, replica] = load_run_config(ROOT / row["config"], argv)
    return configs


def bench_row(name: str, variant: str, arms: list[tuple[str, list[str]]], configs: dict, args) -> list[dict]:
    from ddistill.engine.trainer import Trainer

    trainers = {key: Trainer(cfg) for key, cfg in configs.items()}  # (label, replica), replica-major
    for trainer in trainers.values():
        for _ in range(args.warmup):
            optimizer_step(trainer)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in trainers}
    tokens: dict[str, int] = {}
    for _ in range(args.blocks):
        for (label, replica), trainer in trainers.items():
            synchronize(trainer.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                last = optimizer_step(trainer)
            synchronize(trainer.device)
            times[label, replica].append(1e3 * (time.perf_counter() - start) / args.steps)
            tokens[label] = last.resolve()["tokens"] // trainer.dist.world_size
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    arm_text = " ".join(f"--arm {shlex.join([label, *overrides])}" for label, overrides in arms)
    command = (f"python benchmarks/bench_engine_ab.py --rows {name} --variants {variant} --blocks {args.blocks} "
               f"--steps {args.steps} {arm_text}" + "".join(f" --set {s}" for s in args.set)
               + (f" --replicas {args.replicas}" if args.replicas > 1 else ""))  # fmt: skip
    blocks = {label: [t for (lab, _), ts in times.items() if lab == label for t in ts] for label, _ in arms}
    first = statistics.median(blocks[arms[0][0]])
    results = []
    for label, overrides in arms:
        ms = statistics.median(blocks[label])
        per_replica = [statistics.median(times[label, r]) for r in range(args.replicas)]
        probe = trainers[label, 0]
        kernel_ms, kernels = kernel_time(probe) if probe.device.type == "cuda" else (None, None)
        waited = "" if kernel_ms is None else f", kernels {kernel_ms:.2f} ms ({kernels:.0f} a step)"
        spread = "" if args.replicas == 1 else f"; replicas {['%.2f' % t for t in per_replica]}"
        print(f"{name} / {variant} / {label}: {ms:.2f} ms a step ({first / ms:.3f}x the first arm), "
              f"{1e3 * tokens[label] / ms:,.0f} tokens/s{waited}{spread}; blocks {['%.2f' % t for t in blocks[label]]}",
              flush=True)  # fmt: skip
        results.append(dict(env, timestamp=stamp, row=name, variant=variant, arm=label, overrides=" ".join(overrides),
                            ms_per_step=round(ms, 3), tokens_per_s=round(1e3 * tokens[label] / ms, 1),
                            kernel_ms="" if kernel_ms is None else round(kernel_ms, 3),
                            kernels_per_step="" if kernels is None else round(kernels),
                            ratio=round(first / ms, 4), blocks_ms=" ".join(f"{t:.2f}" for t in blocks[label]),
                            command=command, replica_ms=" ".join(f"{t:.2f}" for t in per_replica)))  # fmt: skip
    return results


def write_markdown() -> None:
    import csv

    with CSV_PATH.open() as fh:
        rows = list(csv.DictReader(fh))
    lines = ["# Run-config overrides A/B-tested in one process (benchmarks/bench_engine_ab.py)", "",
             "One trainer per arm, alternating blocks of steps; ms per step = the median over the arm's blocks; "
             "ratio = the first arm's ms over this arm's; kernels = the sum of CUDA kernel durations a step; overrides = "
             "the row's `--set` ones, then the arm's; replicas ms = each replica trainer's median (`--replicas`; "
             "'-': one trainer an arm, whose ratio carries the trainer-to-trainer spread unseen).", "",
             "| card | git | row | variant | arm | overrides | ms/step | tokens/s | kernels ms | kernels/step | "
             "ratio | replicas ms | blocks ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        common = re.findall(r"--set (\S+)", r["command"])  # every arm's overrides, e.g. the batch size
        overrides = " ".join([*common, r["overrides"]]).strip()
        lines.append(f"| {r['gpu']} | {r['git_rev']} | {r['row']} | {r['variant']} | {r['arm']} | "
                     f"{overrides or '(none)'} | {float(r['ms_per_step']):.2f} | {float(r['tokens_per_s']):,.0f} | "
                     f"{r['kernel_ms']} | {r['kernels_per_step']} | {float(r['ratio']):.3f} | "
                     f"{r.get('replica_ms') or '-'} | {r['blocks_ms']} |")
    MD_PATH.write_text("\n".join(lines) + "\n")


def parse_arms(parser: argparse.ArgumentParser, raw: list[list[str]] | None) -> list[tuple[str, list[str]]]:
    arms = [(entry[0], entry[1:]) for entry in raw or []]
    if len(arms) < 2:
        parser.error(f"give at least two --arm LABEL [KEY=VALUE ...] (got {len(arms)})")
    labels = [label for label, _ in arms]
    for label, overrides in arms:
        if "=" in label:
            parser.error(f"--arm {label!r}: the first word is the arm's label, then its KEY=VALUE overrides")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            parser.error(f"--arm {label}: {bad} are not KEY=VALUE overrides")
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        parser.error(f"--arm labels must differ; repeated: {duplicated}")
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(parser, rows="mdlm_small", variants="chunked+compile")
    parser.add_argument("--arm", action="append", nargs="+", metavar="LABEL [KEY=VALUE]",
                        help="one arm: a label, then its overrides (repeat; at least two)")
    parser.add_argument("--blocks", type=int, default=4, help="rounds of one block per arm")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=6, help="steps per arm before timing (compilation, caches)")
    parser.add_argument("--replicas", type=int, default=1, help="trainers per arm (identical work; module docstring)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    rows, variants = parse_rows(parser, args)
    arms = parse_arms(parser, args.arm)
    for flag, value, low in (("--blocks", args.blocks, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--replicas", args.replicas, 1)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    from ddistill.config import ConfigError

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_engine_ab_") as tmp:
        try:  # every arm's config of every row before the first trainer: a bad override costs no work
            configs = {(n, v): arm_configs(n, v, arms, args, Path(tmp), args.replicas) for n in rows for v in variants}
        except ConfigError as err:
            parser.error(str(err))
        for (name, variant), arm_cfgs in configs.items():
            results += bench_row(name, variant, arms, arm_cfgs, args)
    if not args.no_save:
        append_csv(results, CSV_PATH, FIELDS)
        write_markdown()


if __name__ == "__main__":
    sys.exit(main())
