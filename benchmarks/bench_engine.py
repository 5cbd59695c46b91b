"""`ddistill train` itself, timed: tokens/s, ms per step, peak memory and model FLOP utilisation per recipe row.

    python benchmarks/bench_engine.py                                   # every row, every variant (one GPU)
    python benchmarks/bench_engine.py --rows sdtt_small --variants fused --set deepspeed.frozen_zero_stage=0
    python benchmarks/bench_engine.py --rows mdlm_tiny --profile        # host profile, host syncs, GPU kernels
    python benchmarks/bench_engine.py --device cpu --rows mdlm_test --steps 4 --no-save   # CPU smoke run

Each (row, variant) runs `python -m ddistill.engine CONFIG overrides...` in a fresh process on the classics corpus
(`data.dataset=classics`, no download) for `--steps` optimizer steps, logging every steps/2: the figure is the
trainer's own tokens/s over the second half (warm-up, JIT and compilation fall in the first), read from the
`SUMMARY` line; peak memory is the trainer's (max allocated over the run). SDTT, DCD and DiMO rows start from a
random public-layout checkpoint (MDLM or DUO layout) of the row's size written once per invocation (`init_from`; the
speed does not depend on the weights: the teacher's reveal decisions don't read its outputs). The DUO row is the
curriculum step of the `duo_owt_small` recipe (exact top-k latent).

Variants: `baseline` = the straightforward PyTorch path (`method.loss_impl=torch`: materialised logits, eager), the
reference's style; `fused` = the fused Triton losses; `fused+compile` = fused + regional torch.compile of the DiT
blocks (`train.compile=true`); `compile` = the torch loss + regional compile; `chunked`, `chunked+compile` = the row-chunked cuBLAS losses (`method.loss_impl=chunked`, gradient
formed in the forward), eager and compiled. Every row prints its speed-up over its own baseline when both ran.

MFU = tokens/s × model FLOPs per token / `--peak-tflops` (default 790, the bf16 matrix rate measured on an H200 of
this workplace). Model FLOPs per token, N = parameters without the input embedding (the output layer included),
n = blocks, d = width, L = length: training 6N + 12·n·d·L (attention scores and values, fwd + bwd); an SDTT step
adds k teacher forwards of 2N + 4·n·d·L each (as if the teacher's logits were computed everywhere), a DCD step one;
a DiMO step (`dimo_small`, batch 8 as in `bench_dimo_step.py`) is 5 + 4k forward-equivalents of 2N + 4·n·d·L
(generator forward and backward, teacher and aux forwards, then per aux step a generator forward and the aux
forward and backward; k = aux_steps), plus 1 + k generator forwards with `method.refine_frac` > 0 (the no-grad draw
that builds the refinement inputs, once per phase).
Results go to results/engine.csv (card, versions, git revision, command) and results/engine.md.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from gpu_gaps import print_idle_gaps
from harness import RESULTS, ROOT, append_csv, environment

CSV_PATH = RESULTS / "engine.csv"
MD_PATH = RESULTS / "engine.md"
FIELDS = ["timestamp", "gpu", "torch", "triton", "git_rev", "row", "variant", "extra", "params_M", "batch", "length",
          "steps", "tokens_per_s", "step_ms", "mfu", "peak_mem_gib", "final_loss", "status", "command"]  # fmt: skip

ROWS: dict[str, dict] = {
    "mdlm_tiny": dict(config="configs/experiments/classics_mdlm_tiny.yaml", method="mdlm",
                      overrides=["train.global_batch_size=64", "train.micro_batch_size=64"]),
    "mdlm_small": dict(config="configs/experiments/owt_mdlm_small.yaml", method="mdlm",
                       overrides=["data.dataset=classics", "train.global_batch_size=32", "train.micro_batch_size=32"]),
    "sdtt_small": dict(config="configs/experiments/sdtt_owt_small.yaml", method="sdtt",
                       overrides=["data.dataset=classics", "train.global_batch_size=32", "train.micro_batch_size=32"]),
    "duo_small": dict(config="configs/experiments/duo_owt_small.yaml", method="duo",
                      overrides=["data.dataset=classics", "train.global_batch_size=32", "train.micro_batch_size=32"]),
    "dcd_small": dict(config="configs/experiments/dcd_owt_small.yaml", method="dcd",
                      overrides=["data.dataset=classics", "train.global_batch_size=32", "train.micro_batch_size=32"]),
    "dimo_small": dict(config="configs/experiments/dimo_owt_small.yaml", method="dimo",
                       overrides=["data.dataset=classics", "train.global_batch_size=8", "train.micro_batch_size=8"]),
    "mdlm_test": dict(config="configs/experiments/classics_mdlm_test.yaml", method="mdlm",  # CPU smoke size
                      overrides=["train.global_batch_size=4", "train.micro_batch_size=4"]),
    "dimo_test": dict(config="configs/experiments/dimo_classics_tiny.yaml", method="dimo",  # CPU smoke size
                      overrides=["model.size=test", "model.length=32", "data.block_size=32",
                                 "train.global_batch_size=2", "train.micro_batch_size=2"]),
}
# Rows whose method starts from a checkpoint, and its layout: they get a random public-layout one (`row_config`).
CHECKPOINT_LAYOUT = {"sdtt": "mdlm", "dcd": "duo", "dimo": "mdlm"}
VARIANTS: dict[str, list[str]] = {
    "baseline": ["method.loss_impl=torch"],
    "fused": ["method.loss_impl=triton"],
    "fused+compile": ["method.loss_impl=triton", "train.compile=true"],
    "compile": ["method.loss_impl=torch", "train.compile=true"],
    "chunked": ["method.loss_impl=chunked"],
    "chunked+compile": ["method.loss_impl=chunked", "train.compile=true"],
}


def model_flops_per_token(model_cfg, method: str, k: int, refine: bool = False) -> tuple[float, int]:
    """(model FLOPs per token of one training step, parameter count) by the module docstring's count."""
    import torch

    from ddistill.models.dit import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    params = model.num_parameters()
    n_prime = params - model_cfg.vocab_size * model_cfg.hidden_size  # without the input embedding
    attention = model_cfg.n_blocks * model_cfg.hidden_size * model_cfg.length
    flops = 6 * n_prime + 12 * attention
    if method in ("sdtt", "dcd"):  # k teacher forwards
        flops += k * (2 * n_prime + 4 * attention)
    if method == "dimo":  # 5 + 4k forward-equivalents, k = aux_steps (+ 1 + k with refinement inputs)
        flops = (5 + 4 * k + (1 + k if refine else 0)) * (2 * n_prime + 4 * attention)
    return float(flops), params


def row_config(name: str, variant: str, extra: list[str], work: Path):
    """(the row's run config, the extra overrides): a row whose method starts from a checkpoint that is not on disk
    (a hub id, or none) gets a random public-layout one, written once per invocation under `work`."""
    from ddistill.engine.run_config import load_run_config

    row = ROWS[name]
    extra = list(extra)
    cfg = load_run_config(ROOT / row["config"], [*row["overrides"], *VARIANTS[variant], *extra])
    layout = CHECKPOINT_LAYOUT.get(row["method"])
    if layout and (cfg.init_from is None or not Path(cfg.init_from).exists()):
        init = work / f"init-{row['method']}-{cfg.model.size}-{cfg.model.length}"
        if not init.exists():
            random_checkpoint(cfg.model, init, flavor=layout)
        extra.append(f"init_from={init}")
    return cfg, extra


def random_checkpoint(model_cfg, out: Path, flavor: str) -> Path:
    """A public-layout MDLM (SDTT rows) or DUO (DCD rows) checkpoint with random weights, output layer included."""
    import torch

    from ddistill.models.checkpoints import save_pretrained
    from ddistill.models.dit import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg)
    with torch.no_grad():
        model.output_weight.normal_(0.0, 0.02)
    return save_pretrained(model, out, flavor=flavor)


def engine_args(row: dict, variant: str, extra: list[str], steps: int, out_dir: Path, device: str) -> list[str]:
    return [row["config"], *row["overrides"], *VARIANTS[variant], f"train.max_steps={steps}",
            f"train.log_every={max(1, steps // 2)}", f"train.ckpt_every={10**9}", "train.eval_every=0",
            "train.export_final=false", f"train.out_dir={out_dir}", f"train.device={device}",
            "logging.wandb=disabled", "logging.progress_bar=false", "logging.jsonl=false", *extra]  # fmt: skip


def run_row(name: str, variant: str, args, work: Path, env: dict) -> dict:
    row = ROWS[name]
    out_dir = work / f"{name}-{variant}".replace("+", "_")
    cfg, extra = row_config(name, variant, args.set, work)
    if row["method"] == "dcd":
        k = 1
    elif row["method"] == "dimo":
        k = cfg.method.config.aux_steps
    else:
        k = getattr(cfg.method.config, "num_teacher_steps", 0)
    refine = row["method"] == "dimo" and cfg.method.config.refine_frac > 0
    flops, params = model_flops_per_token(cfg.model, row["method"], k, refine)
    command = [sys.executable, "-m", "ddistill.engine", *engine_args(row, variant, extra, args.steps, out_dir,
                                                                    args.device)]  # fmt: skip
    result = dict(row=name, variant=variant, extra=" ".join(args.set), params_M=round(params / 1e6, 1),
                  batch=cfg.train.micro_batch_size, length=cfg.model.length, steps=args.steps,
                  command=" ".join(command[1:]))
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = next((json.loads(line[len("SUMMARY "):]) for line in proc.stdout.splitlines()
                    if line.startswith("SUMMARY ")), None)  # fmt: skip
    if proc.returncode != 0 or summary is None:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"== {name} / {variant} failed (rc {proc.returncode}):\n{tail}", flush=True)
        status = "OOM" if "OutOfMemoryError" in tail else f"error rc={proc.returncode}"
        return result | dict(status=status)
    tokens_per_s = summary["tokens_per_s_per_rank"]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.length / summary["world_size"]
    return result | dict(
        tokens_per_s=round(tokens_per_s, 1), step_ms=round(1e3 * tokens_per_step / tokens_per_s, 2),
        mfu=round(tokens_per_s * flops / (args.peak_tflops * 1e12), 4),
        peak_mem_gib=round(max(summary["peak_mem_gib_per_rank"]), 2),
        final_loss=summary["last_metrics"].get("loss"), status=f"ok ({time.perf_counter() - started:.0f} s)",
    )  # fmt: skip


def optimizer_step(trainer):
    """One optimizer step on the trainer's next micro-batches, as `Trainer.fit` runs it: the metrics stay on the
    device (returned unresolved; fit reads them at log lines only)."""
    return trainer.train_step_deferred([next(trainer.loader) for _ in range(trainer.grad_accum)])


def profile_row(name: str, variant: str, args, work: Path) -> None:
    """In-process: warm up, then cProfile `--steps` steps and count the host<->device syncs per step."""
    import torch

    from ddistill.engine.run_config import load_run_config
    from ddistill.engine.trainer import Trainer

    row = ROWS[name]
    _, extra = row_config(name, variant, args.set, work)
    overrides = engine_args(row, variant, extra, args.steps, work / "profile", args.device)[1:]
    trainer = Trainer(load_run_config(ROOT / row["config"], overrides))

    def step():  # print_idle_gaps calls it without arguments
        optimizer_step(trainer)

    for _ in range(5):
        step()
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    profiler = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        profiler.enable()
        for _ in range(args.steps):
            step()
        profiler.disable()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    if cuda:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    print(f"== profile {name} / {variant}: {1e3 * elapsed / args.steps:.2f} ms per step, "
          f"{len(syncs) / args.steps:.1f} host syncs per step", flush=True)  # fmt: skip
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    for key, count in sorted(where.items(), key=lambda kv: -kv[1])[:15]:
        print(f"   sync {count / args.steps:5.1f}/step at {key}")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue()[-9000:], flush=True)
    if cuda:  # the device side: which kernels the step's time goes to
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        print(f"== GPU kernels over {args.steps} steps (self CUDA time)", flush=True)
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70),
              flush=True)
        print_idle_gaps(step, args.steps, work)


def write_markdown() -> None:
    """results/engine.md: the latest measurement per (gpu, row, variant, extra), with the speed-up over baseline."""
    import csv

    latest: dict[tuple, dict] = {}
    with CSV_PATH.open() as fh:
        for r in csv.DictReader(fh):
            latest[(r["gpu"], r["row"], r["variant"], r["extra"])] = r
    lines = ["# `ddistill train` through the engine (benchmarks/bench_engine.py)", "",
             "Generated from `engine.csv`; latest run per (card, row, variant, extra overrides). × baseline = "
             "tokens/s over the same row's `baseline` (method.loss_impl=torch, eager) with the same extra overrides.",
             "", "| card | git | row | variant | extra | batch×L | tokens/s | ms/step | MFU | × baseline | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (gpu, row, variant, extra), r in sorted(latest.items()):
        if not r["tokens_per_s"]:
            lines.append(f"| {gpu} | {r['git_rev']} | {row} | {variant} | {extra} | {r['batch']}×{r['length']} | "
                         f"{r['status']} | | | | |")  # fmt: skip
            continue
        base = latest.get((gpu, row, "baseline", extra))
        ratio = (f"{float(r['tokens_per_s']) / float(base['tokens_per_s']):.2f}"
                 if base and base["tokens_per_s"] else "")  # fmt: skip
        lines.append(f"| {gpu} | {r['git_rev']} | {row} | {variant} | {extra} | {r['batch']}×{r['length']} | "
                     f"{float(r['tokens_per_s']):,.0f} | {r['step_ms']} | {float(r['mfu']):.1%} | {ratio} | "
                     f"{r['peak_mem_gib']} |")  # fmt: skip
    MD_PATH.write_text("\n".join(lines) + "\n")


def add_row_arguments(parser: argparse.ArgumentParser, rows: str, variants: str) -> None:
    """--rows, --variants (comma lists of ROWS / VARIANTS, with these defaults) and --set."""
    parser.add_argument("--rows", default=rows, help=f"comma list of {sorted(ROWS)}")
    parser.add_argument("--variants", default=variants, help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra dotted override for every run (repeatable), e.g. deepspeed.frozen_zero_stage=0")


def parse_rows(parser: argparse.ArgumentParser, args) -> tuple[list[str], list[str]]:
    """(rows, variants) of `add_row_arguments`; an unknown name is a parser error that names it."""
    rows, variants = args.rows.split(","), args.variants.split(",")
    for bad, known, what in ((set(rows) - set(ROWS), ROWS, "--rows"), (set(variants) - set(VARIANTS), VARIANTS,
                                                                        "--variants")):  # fmt: skip
        if bad:
            parser.error(f"{what}: unknown {sorted(bad)}; choose from {sorted(known)}")
    return rows, variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_row_arguments(parser, rows="mdlm_tiny,mdlm_small,sdtt_small", variants="baseline,fused,fused+compile")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--profile", action="store_true", help="host profile of the first row/variant; no results")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    rows, variants = parse_rows(parser, args)
    if args.steps < 2:
        parser.error(f"--steps={args.steps} must be >= 2 (the second half is timed)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if args.device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        work = Path(tmp)
        if args.profile:
            profile_row(rows[0], variants[0], args, work)
            return
        info = environment()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        results = []
        for name in rows:
            for variant in variants:
                result = {"timestamp": stamp, **info, **run_row(name, variant, args, work, env)}
                results.append(result)
                base = next((r for r in results if r["row"] == name and r["variant"] == "baseline"
                             and r.get("tokens_per_s")), None)  # fmt: skip
                ratio = (f"  x{result['tokens_per_s'] / base['tokens_per_s']:.2f} vs baseline"
                         if base and result.get("tokens_per_s") else "")  # fmt: skip
                print(f"{name:11s} {variant:14s} {' '.join(args.set):30s} tokens/s {result.get('tokens_per_s', '-')}"
                      f"  ms/step {result.get('step_ms', '-')}  MFU {result.get('mfu', '-')}  peak GiB "
                      f"{result.get('peak_mem_gib', '-')}  {result['status']}{ratio}", flush=True)  # fmt: skip
    if not args.no_save:
        append_csv(results, CSV_PATH, FIELDS)
        write_markdown()


if __name__ == "__main__":
    main()
