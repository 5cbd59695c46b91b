"""DUO curriculum step (full B×L×V latent vs the exact low-memory top-k path) and DCD step through the engine:
tokens/s and peak memory on one GPU.

    python benchmarks/bench_duo.py                                   # small DiT, batch 32 x 1024, every case
    python benchmarks/bench_duo.py --cases duo_topk,dcd_engine --batch 16
    python benchmarks/bench_duo.py --device cpu --size test --vocab-size 1001 --batch 2 --length 32 \
        --steps 1 --warmup 0 --no-save                              # CPU smoke run

Cases (one optimizer step = the method's loss on one micro-batch, backward, AdamW step; the DiT's bf16 autocast):
* ``duo_full``: `duo` curriculum, latent=full (the reference: ε, w/τ and softmax(w/τ) as (B, L, V) fp32 tensors);
* ``duo_topk``: `duo` curriculum, latent=topk (top-16 order statistics, embedding_bag; no (B, L, V) latent);
* ``duo_topk_fused``: the same with loss_impl=triton (the fused uniform-ELBO kernel: no (B, L, V) logits either);
* ``usdm``: the plain discrete ELBO step of the same DiT (what the curriculum's cost compares with);
* ``dcd_engine``: a `dcd` step through `ddistill.engine.Trainer` (ZeRO-2 student with EMA, ZeRO-3 frozen teacher).
Peak memory is `torch.cuda.max_memory_allocated` over the timed steps (weights, AdamW state and activations
included). Rows are appended to benchmarks/results/duo.csv (GPU, torch, triton, git revision) and
benchmarks/results/duo.md is regenerated from it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import tempfile
import time

import numpy as np
import torch

from harness import RESULTS, append_csv, environment, synchronize

from ddistill.methods import get_method
from ddistill.methods.base import StepContext
from ddistill.models.dit import ModelConfig, build_model

CSV_PATH, MD_PATH = RESULTS / "duo.csv", RESULTS / "duo.md"
FIELDS = ["timestamp", "gpu", "torch", "triton", "git_rev", "case", "size", "batch", "length", "V", "top_k", "steps",
          "step_ms", "tokens_per_s", "peak_mem_gib", "final_loss", "status"]  # fmt: skip
CASES = ("duo_full", "duo_topk", "duo_topk_fused", "usdm", "dcd_engine")


def _method_case(case: str, args, device: torch.device) -> dict:
    """One method step per iteration on a plain DiT (no engine): the curriculum's own cost."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(size=args.size, vocab_size=args.vocab_size, length=args.length,
                            autocast_dtype="bfloat16" if device.type == "cuda" else "float32")
    model = build_model(model_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if case == "usdm":
        usdm = get_method("usdm")
        method = usdm(usdm.Config(), vocab_size=args.vocab_size, mask_id=args.vocab_size - 1)
    else:
        latent, _, fused = case.removeprefix("duo_").partition("_")
        cfg = get_method("duo").Config(latent=latent, top_k=args.top_k, loss_impl="triton" if fused else "torch")
        method = get_method("duo")(cfg, vocab_size=args.vocab_size, mask_id=args.vocab_size - 1)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randint(0, args.vocab_size, (args.batch, args.length), device=device, generator=gen)

    def step(i: int) -> float:
        ctx = StepContext(step=i, micro_step=0, global_offset=0, global_batch_size=args.batch,
                          generator=torch.Generator(device=device).manual_seed(i), device=device, rank=0,
                          world_size=1)
        loss = method.step({"student": model}, x0, ctx).losses["student"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return _timed(step, args, device)


def _engine_case(args, device: torch.device) -> dict:
    """A DCD step through the Trainer: teacher and student initialised from one saved DUO model."""
    from ddistill.engine.run_config import run_config_from_dict
    from ddistill.engine.trainer import Trainer
    from ddistill.models.checkpoints import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_model(ModelConfig(size=args.size, vocab_size=args.vocab_size, length=args.length))
        init = save_pretrained(model, f"{tmp}/teacher", flavor="duo")
        del model
        cfg = run_config_from_dict({
            "model": {"size": args.size, "vocab_size": args.vocab_size, "length": args.length,
                      "time_conditioning": True},
            "data": {"dataset": "classics", "block_size": args.length},
            "method": {"name": "dcd"},
            "optim": {"lr": 6e-5, "warmup_steps": 0},
            "train": {"max_steps": 10**6, "global_batch_size": args.batch, "micro_batch_size": args.batch,
                      "out_dir": f"{tmp}/run", "device": device.type, "export_final": False, "ema_decay": 0.999},
            "logging": {"wandb": "disabled", "progress_bar": False, "jsonl": False},
            "init_from": str(init),
        })  # fmt: skip
        blocks = np.random.default_rng(0).integers(0, args.vocab_size, size=(4 * args.batch, args.length))
        trainer = Trainer(cfg, train_blocks=blocks)

        def step(i: int) -> float:
            return float(trainer.train_step([next(trainer.loader)])["loss/student"])

        return _timed(step, args, device)


def _timed(step, args, device: torch.device) -> dict:
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = float("nan")
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(step_ms=round(seconds * 1e3, 2), tokens_per_s=round(args.batch * args.length / seconds),
                peak_mem_gib=round(peak, 2), final_loss=round(loss, 5), status="ok")


def write_markdown() -> None:
    with CSV_PATH.open() as fh:
        rows = list(csv.DictReader(fh))
    latest = {(r["gpu"], r["case"], r["size"], r["batch"], r["length"]): r for r in rows}
    lines = ["# DUO curriculum and DCD step benchmarks", "",
             "Generated by `python benchmarks/bench_duo.py` from `duo.csv`; latest run per key. One optimizer step "
             "(loss, backward, AdamW) on one GPU, bf16 autocast; peak = `torch.cuda.max_memory_allocated`.", ""]
    for gpu in sorted({k[0] for k in latest}):
        lines += [f"## {gpu}", "",
                  "| case | size | batch × L | top-k | ms/step | tokens/s | peak GiB | status | rev | torch |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in sorted(latest.items()):
            if key[0] == gpu:
                lines.append(f"| {r['case']} | {r['size']} | {r['batch']} × {r['length']} | {r['top_k']} | "
                             f"{r['step_ms']} | {r['tokens_per_s']} | {r['peak_mem_gib']} | {r['status']} | "
                             f"{r['git_rev']} | {r['torch']} |")
        lines.append("")
    MD_PATH.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=50258)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; use --device cpu for the smoke run")
    env = environment()
    rows = []
    for case in cases:
        row = dict(timestamp=datetime.datetime.now().isoformat(timespec="seconds"), **env, case=case, size=args.size,
                   batch=args.batch, length=args.length, V=args.vocab_size, steps=args.steps,
                   top_k=args.top_k if case.startswith("duo_topk") else "")
        try:
            row |= _engine_case(args, device) if case == "dcd_engine" else _method_case(case, args, device)
        except torch.OutOfMemoryError:
            row |= dict(status="oom")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(row, flush=True)
        rows.append(row)
    if not args.no_save:
        append_csv(rows, CSV_PATH, FIELDS)
        write_markdown()


if __name__ == "__main__":
    main()
