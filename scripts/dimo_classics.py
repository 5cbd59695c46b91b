"""DiMO on the classics corpus end to end, in one process and within a time budget (for one lent GPU call):

    train an MDLM teacher (configs/experiments/classics_mdlm_tiny.yaml) → export it
    → DiMO from it (configs/experiments/dimo_classics_tiny.yaml) → export the generator's EMA
    → sample the teacher (MDLM sampler) and the generator (DiMO sampler, plus a temperature sweep at chosen steps)
      at the same step counts, with the same seeds → OUT/samples.pt (token ids) and OUT/train_log.json
    → score (separately, wherever the judge is): Gen PPL with its bootstrap interval, Gen PPL over the teacher's at
      the same steps (interval), unigram entropy, distinct-2/3/4, duplicate fraction
      → OUT/eval/dimo_classics.{csv,md,png}, the per-sample judge scores and the decoded samples.

    python scripts/dimo_classics.py run --tokens CACHE/tokens/classics-train-L128-...npy --out runs/dimo_classics
    python scripts/dimo_classics.py score --out runs/dimo_classics --judge smollm2
    python scripts/dimo_classics.py score --out runs/other_setting --reference runs/dimo_classics   # its teacher
    python scripts/dimo_classics.py run ... --size test --teacher-steps 3 --dimo-steps 2 --device cpu   # smoke

The training blocks are read straight from a token-cache .npy (no corpus or tokenizer needed on the GPU node).
Every run stops at its step count or its time budget, whichever comes first; the log records which.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER_CONFIG = ROOT / "configs/experiments/classics_mdlm_tiny.yaml"
DIMO_CONFIG = ROOT / "configs/experiments/dimo_classics_tiny.yaml"


def train(config: Path, overrides: list[str], blocks: np.ndarray, max_seconds: float, log_every: int,
          after_step=None) -> dict:
    """Train `config` for train.max_steps steps or `max_seconds` of training, then export; returns the log.
    `after_step(trainer)` runs after every step, off the clock (the DiMO snapshots)."""
    from ddistill.engine.run_config import load_run_config
    from ddistill.engine.trainer import Trainer

    cfg = load_run_config(config, overrides)
    trainer = Trainer(cfg, train_blocks=blocks)
    seconds, history = 0.0, []
    while trainer.step < cfg.train.max_steps and seconds < max_seconds:
        start = time.perf_counter()
        metrics = trainer.train_step([next(trainer.loader) for _ in range(trainer.grad_accum)])
        if trainer.step % log_every == 0 or trainer.step == 1:
            history.append({"step": trainer.step, **{k: float(v) for k, v in metrics.items()
                                                     if isinstance(v, (int, float)) or torch.is_tensor(v)}})
            print(json.dumps(history[-1]), flush=True)
        if after_step is not None and trainer.device.type == "cuda":  # the callback's time is not training time
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        if after_step is not None:
            after_step(trainer)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    export = trainer.export()
    log = {"config": str(config.relative_to(ROOT)), "overrides": overrides, "steps": trainer.step,
           "planned_steps": cfg.train.max_steps, "seconds": seconds, "export": str(export), "history": history,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None}
    del trainer
    return log


def draw_samples(fn, steps: int, args, device: torch.device, length: int, vocab: int, **kw) -> torch.Tensor:
    """args.num_samples sequences from sampler `fn` at `steps` steps, in batches, seeded by (seed, steps, batch)."""
    tokens = []
    for start in range(0, args.num_samples, args.batch_size):
        size = min(args.batch_size, args.num_samples - start)
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + steps * 10_007 + start)
        tokens.append(fn(batch_size=size, length=length, num_steps=steps, mask_id=vocab - 1, vocab_size=vocab,
                         generator=gen, device=device, **kw).tokens.cpu())
    return torch.cat(tokens)


def dimo_sampler_args(generator, args) -> dict:
    return dict(embed_dim=generator.config.hidden_size, noise_rms=generator.input_embedding_rms(),
                r_init=args.r_init, embed_noise=args.embed_noise)


class Snapshots:
    """Every `every` (> 0) DiMO steps: one-step samples of the generator's current EMA (labels "dimo@<step>"), so that one
    run shows the Gen-PPL / diversity trade-off along training."""

    def __init__(self, every: int, args, device: torch.device):
        self.every, self.args, self.device = every, args, device
        self.samples: dict[str, dict[int, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, trainer) -> None:
        if trainer.step % self.every:
            return
        from ddistill.diffusion import sample_dimo

        net = trainer.nets["generator"]
        model = copy.deepcopy(net.module).eval()
        net.ema.copy_to(model)
        config = model.config
        self.samples[f"dimo@{trainer.step}"] = {1: draw_samples(
            lambda **kw: sample_dimo(model, **dimo_sampler_args(model, self.args), **kw), 1, self.args, self.device,
            config.length, config.vocab_size)}
        del model


@torch.no_grad()
def sample_all(teacher_dir: str, generator_dir: str, args, device: torch.device) -> dict:
    from ddistill.diffusion import LogLinearSchedule, sample_dimo, sample_mdlm
    from ddistill.models.checkpoints import load_pretrained

    teacher, tcfg = load_pretrained(teacher_dir, overrides={"dropout": 0.0})
    generator, _ = load_pretrained(generator_dir, overrides={"dropout": 0.0})
    teacher, generator = teacher.to(device).eval(), generator.to(device).eval()
    out: dict[str, dict[int, torch.Tensor]] = {}

    def draw(fn, steps, **kw):
        return draw_samples(fn, steps, args, device, tcfg.length, tcfg.vocab_size, **kw)

    for steps in args.teacher_sample_steps:
        out.setdefault("teacher", {})[steps] = draw(
            lambda **kw: sample_mdlm(teacher, schedule=LogLinearSchedule(), **kw), steps)
    dimo_kw = dimo_sampler_args(generator, args)
    for steps in args.dimo_sample_steps:
        out.setdefault("dimo", {})[steps] = draw(lambda **kw: sample_dimo(generator, **dimo_kw, **kw), steps)
        if steps > 1:  # the same generator with uniformly random re-masking between steps
            out.setdefault("dimo remask=random", {})[steps] = draw(
                lambda **kw: sample_dimo(generator, remask="random", **dimo_kw, **kw), steps)
    for power in args.remask_powers:  # one curve a (temperature, re-mask power): random re-masking between steps
        for temperature in args.temperatures:
            label = f"dimo T={temperature}" + ("" if power == 1.0 else f" p={power}")
            for steps in args.temperature_steps:
                out.setdefault(label, {})[steps] = draw(
                    lambda **kw: sample_dimo(generator, temperature=temperature, remask="random", remask_power=power,
                                             **dimo_kw, **kw), steps)
    return out


def cmd_run(args) -> None:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = np.load(args.tokens, mmap_mode="r")
    common = [f"train.device={device.type}", "logging.wandb=disabled", "logging.progress_bar=false",
              "logging.jsonl=false", f"model.size={args.size}", f"model.length={blocks.shape[1]}",
              f"data.block_size={blocks.shape[1]}", "train.eval_every=0", "train.ckpt_every=1000000"]
    log: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "git_rev": args.git_rev, "num_blocks": int(blocks.shape[0])}
    teacher_dir = args.teacher
    if teacher_dir is None:
        log["teacher"] = train(TEACHER_CONFIG, common + [f"train.out_dir={out / 'teacher'}",
                                                         f"train.max_steps={args.teacher_steps}",
                                                         "model.time_conditioning=false", *args.teacher_overrides],
                               blocks, args.teacher_seconds, args.log_every)
        teacher_dir = log["teacher"]["export"]
    if args.teacher_only:  # e.g. one teacher for several DiMO settings run beside each other with --teacher
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
        print(f"teacher exported to {teacher_dir}", flush=True)
        return
    snapshots = Snapshots(args.snapshot_every, args, device) if args.snapshot_every else None
    log["dimo"] = train(DIMO_CONFIG, common + [f"train.out_dir={out / 'dimo'}", f"train.max_steps={args.dimo_steps}",
                                               f"init_from={teacher_dir}", f"method.r_init={args.r_init}",
                                               f"method.embed_noise={args.embed_noise}", *args.dimo_overrides],
                        blocks, args.dimo_seconds, args.log_every, after_step=snapshots)
    start = time.perf_counter()
    samples = sample_all(teacher_dir, log["dimo"]["export"], args, device)
    if snapshots is not None:
        samples.update(snapshots.samples)
    log["sample_seconds"] = time.perf_counter() - start
    torch.save({"samples": samples, "length": int(blocks.shape[1])}, out / "samples.pt")
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"wrote {out / 'samples.pt'} and {out / 'train_log.json'}", flush=True)


TEACHER_LABEL = "teacher"


def cmd_score(args) -> None:
    """Score every (label, steps) row: Gen PPL with its 95% bootstrap interval over samples, and each non-teacher
    row's Gen PPL over the teacher's at the same step count (`ppl_ratio`, bootstrap interval; the DiMO and MDLM
    samplers share no random numbers, so the two sets are resampled independently). The teacher rows come from this
    run or, when it sampled none, from the scored run `--reference`. Per-sample judge scores are kept in
    eval/scores.pt, so that later runs can use this one as their reference without re-scoring it."""
    from ddistill.data.tokenizer import MASK_ID, get_tokenizer
    from ddistill.eval.decode import decode_samples
    from ddistill.eval.judge import load_judge
    from ddistill.eval.metrics import (distinct_n, duplicate_fraction, gen_ppl_interval, gen_ppl_ratio_interval,
                                       unigram_entropy)
    from ddistill.eval.report import EvalRow, write_report

    out = Path(args.out)
    data = torch.load(out / "samples.pt")
    log = json.loads((out / "train_log.json").read_text())
    wanted = None if args.rows is None else {tuple(r.rsplit(":", 1)) for r in args.rows}
    todo = [(label, int(steps), tokens[: args.max_samples]) for label, by_steps in data["samples"].items()
            for steps, tokens in sorted(by_steps.items()) if wanted is None or (label, str(steps)) in wanted]
    missing = sorted(set(wanted or ()) - {(label, str(steps)) for label, steps, _ in todo})
    if missing:  # before the judge loads or anything is written
        raise SystemExit(f"dimo_classics.py: --rows {[':'.join(m) for m in missing]} are not in {out / 'samples.pt'}")
    reference = {}
    if args.reference is not None:
        saved = torch.load(Path(args.reference) / "eval/scores.pt", weights_only=False)  # numpy arrays we wrote
        reference = {key: value for key, value in saved.items() if key[0] == TEACHER_LABEL}
    judge, tokenizer = load_judge(args.judge), get_tokenizer()
    scores, texts, rows = {}, {}, []
    for label, steps, tokens in sorted(todo, key=lambda r: r[0] != TEACHER_LABEL):  # teacher rows first
        decoded = decode_samples(tokens, tokenizer, MASK_ID)
        texts[f"{label} steps={steps}"] = decoded[: args.show]
        nll, count = judge.score_texts_per_sample(decoded, batch_size=8, max_length=data["length"])
        scores[label, steps] = (nll, count)
        lo, hi = gen_ppl_interval(nll, count, seed=args.seed)
        row = EvalRow(label=label, steps=steps, nfe=float(steps), gen_ppl=float(np.exp(nll.sum() / count.sum())),
                      gen_ppl_lo=lo, gen_ppl_hi=hi, entropy=unigram_entropy(tokens), distinct_2=distinct_n(tokens, 2),
                      distinct_3=distinct_n(tokens, 3), distinct_4=distinct_n(tokens, 4),
                      duplicate_frac=duplicate_fraction(tokens), num_samples=tokens.shape[0], judge=judge.name,
                      device=log["device"])
        teacher = scores.get((TEACHER_LABEL, steps), reference.get((TEACHER_LABEL, steps)))
        if label != TEACHER_LABEL and teacher is not None:
            ratio, r_lo, r_hi = gen_ppl_ratio_interval(nll, count, *teacher, seed=args.seed)
            row = dataclasses.replace(row, ppl_ratio=ratio, ppl_ratio_lo=r_lo, ppl_ratio_hi=r_hi,
                                      ppl_ratio_bootstrap="independent")
        rows.append(row)
        print(row, flush=True)
    paths = write_report(rows, out / "eval", stem="dimo_classics", merge=False)
    torch.save(scores, out / "eval/scores.pt")
    (out / "eval" / "samples.json").write_text(json.dumps(texts, indent=1))
    print({k: str(v) for k, v in paths.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--tokens", required=True, help="a classics token-cache .npy (blocks of the model length)")
    run.add_argument("--out", required=True)
    run.add_argument("--teacher", default=None, help="an MDLM export to distil (default: train one first)")
    run.add_argument("--size", default="tiny")
    run.add_argument("--teacher-steps", type=int, default=2000)
    run.add_argument("--teacher-seconds", type=float, default=60.0)
    run.add_argument("--teacher-overrides", nargs="*", default=[])
    run.add_argument("--dimo-steps", type=int, default=400)
    run.add_argument("--dimo-seconds", type=float, default=45.0)
    run.add_argument("--dimo-overrides", nargs="*", default=[])
    run.add_argument("--r-init", type=float, default=0.6)
    run.add_argument("--embed-noise", type=float, default=0.1)
    run.add_argument("--num-samples", type=int, default=64)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--teacher-only", action="store_true", help="train and export the teacher, then stop")
    run.add_argument("--teacher-sample-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 128],
                     help="step counts of the teacher's samples (none: sample only the generator)")
    run.add_argument("--dimo-sample-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    run.add_argument("--temperatures", type=float, nargs="*", default=[0.5, 0.8, 1.2, 1.5])
    run.add_argument("--temperature-steps", type=int, nargs="+", default=[1],
                     help="step counts of the temperature sweep (rows 'dimo T=<t>', random re-masking between steps)")
    run.add_argument("--remask-powers", type=float, nargs="+", default=[1.0],
                     help="re-mask powers p of the temperature curves (sample_dimo's remask_power; 1: linear)")
    run.add_argument("--log-every", type=int, default=50)
    run.add_argument("--snapshot-every", type=int, default=0,
                     help="also sample the generator's EMA at one step every N DiMO steps (0: only at the end)")
    run.add_argument("--device", default="auto")
    run.add_argument("--git-rev", default=None)
    score = sub.add_parser("score")
    score.add_argument("--out", required=True)
    score.add_argument("--judge", default="smollm2")
    score.add_argument("--show", type=int, default=3, help="decoded samples kept per row in eval/samples.json")
    score.add_argument("--max-samples", type=int, default=None, help="score the first N samples of each row")
    score.add_argument("--rows", nargs="*", default=None, help="only these LABEL:STEPS rows (default: all)")
    score.add_argument("--reference", default=None,
                       help="a scored run (its eval/scores.pt) whose teacher rows are the Gen-PPL ratios' reference "
                            "when this run sampled no teacher")
    score.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    args = parser.parse_args()
    if args.command == "run":
        if not Path(args.tokens).is_file():
            raise SystemExit(f"dimo_classics.py: --tokens {args.tokens} is not a file")
        if min(args.temperature_steps) < 1 or min(args.dimo_sample_steps) < 1:
            raise SystemExit("dimo_classics.py: --dimo-sample-steps and --temperature-steps must be >= 1")
        if any(not t > 0 for t in args.temperatures):  # checked here, not after minutes of training
            raise SystemExit(f"dimo_classics.py: --temperatures {args.temperatures} must all be > 0")
        if any(not 0 < p < float("inf") for p in args.remask_powers):
            raise SystemExit(f"dimo_classics.py: --remask-powers {args.remask_powers} must all be finite and > 0")
        if args.snapshot_every < 0:
            raise SystemExit(f"dimo_classics.py: --snapshot-every {args.snapshot_every} must be >= 0")
        if args.teacher_only and args.teacher is not None:
            raise SystemExit("dimo_classics.py: --teacher-only trains a teacher; it cannot be given with --teacher")
        cmd_run(args)
    else:
        if not (Path(args.out) / "samples.pt").is_file():
            raise SystemExit(f"dimo_classics.py: no samples.pt in {args.out}; run `dimo_classics.py run` first")
        if args.reference is not None and not (Path(args.reference) / "eval/scores.pt").is_file():
            raise SystemExit(f"dimo_classics.py: --reference {args.reference} has no eval/scores.pt; score it first")
        if args.max_samples is not None and args.max_samples < 1:
            raise SystemExit(f"dimo_classics.py: --max-samples {args.max_samples} must be >= 1")
        cmd_score(args)


if __name__ == "__main__":
    main()
