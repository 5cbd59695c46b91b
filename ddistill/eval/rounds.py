"""Evaluate every round of a multi-round distillation run (SDTT arXiv 2410.21035 §4, Figs. 1-2) on one table/plot.

The students of a run are its training checkpoints at the round boundaries: the checkpoint at step
r · steps_per_round (r = 1 … num_rounds) holds the student of round r (1-based, the paper's numbering), trained for
initial_teacher_steps / k^r sampling steps. Each student is sampled from its EMA weights (`ema/student.pt`, as the
paper) and scored by `evaluate_sampler` at every T of a common list of step counts, with label ``"round r"``; an
optional teacher (any public checkpoint, e.g. kuleshov-group/mdlm-owt) gets the label ``"teacher"``. All rows go to
``{stem}.csv/.md/.png`` in ``out_dir``: Gen PPL and entropy vs T, one curve per round (MAUVE in the table when
reference texts are given).

This module reads the engine's checkpoint *files* (``config.yaml``, ``ema/<network>.pt``) and does not import the
engine. Data parallel under torchrun: every rank samples its share, rank 0 scores and writes.

    python -m ddistill.eval.rounds --run-dir outputs/sdtt_owt_small --teacher kuleshov-group/mdlm-owt \\
        --steps 8 16 32 64 128 256 1024 --judge gpt2-large --num-samples 1024 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ddistill.config import load_yaml
from ddistill.diffusion.schedules import build_schedule
from ddistill.eval.report import EvalRow
from ddistill.eval.sample_eval import evaluate_sampler
from ddistill.models.dit import DiT, build_model

__all__ = ["RoundStudent", "find_round_students", "load_checkpoint_student", "evaluate_rounds", "main"]

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass(frozen=True)
class RoundStudent:
    label: str  # "round r" (1-based) or a user label
    path: Path  # a training checkpoint directory (step_XXXXXXXX) or a public checkpoint
    trained_steps: int | None  # the sampling steps this student was distilled for, when known


def find_round_students(run_dir: str | Path) -> list[RoundStudent]:
    """The complete round-boundary checkpoints of a run (``<run_dir>/checkpoints/step_*`` with a MANIFEST.json)."""
    root = Path(run_dir) / "checkpoints"
    found = sorted(
        (int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else []) if (m := _STEP_DIR.match(p.name))
    )
    students = []
    for step, path in found:
        if not (path / "MANIFEST.json").is_file():
            continue  # unfinished or damaged checkpoint
        method = load_yaml(path / "config.yaml")["method"]
        for key in ("steps_per_round", "num_rounds", "initial_teacher_steps", "num_teacher_steps"):
            if key not in method:
                raise ValueError(f"{path}: method {method.get('name')!r} is not a multi-round method (no {key!r})")
        per_round = int(method["steps_per_round"])
        if step == 0 or step % per_round or step // per_round > int(method["num_rounds"]):
            continue
        r = step // per_round
        trained = int(method["initial_teacher_steps"]) // int(method["num_teacher_steps"]) ** r
        students.append(RoundStudent(label=f"round {r}", path=path, trained_steps=trained))
    if not students:
        raise FileNotFoundError(f"no complete round-boundary checkpoint under {root}")
    return students


def load_checkpoint_student(path: str | Path, *, network: str = "student", device: torch.device | str = "cpu") -> DiT:
    """The EMA weights of `network` in a training checkpoint directory, in a DiT built from its run config."""
    path = Path(path)
    ema_file = path / "ema" / f"{network}.pt"
    if not ema_file.is_file():
        raise FileNotFoundError(
            f"{ema_file} does not exist: {path} is not a training checkpoint with an EMA {network!r}"
        )
    model_cfg = dict(load_yaml(path / "config.yaml")["model"])
    device = torch.device(device)
    model_cfg["autocast_dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    model = build_model(model_cfg)
    shadow = torch.load(ema_file, map_location="cpu", weights_only=True)["shadow"]
    params = dict(model.named_parameters())
    if set(params) != set(shadow) or any(params[n].shape != shadow[n].shape for n in params):
        mismatched = sorted(n for n in set(params) & set(shadow) if params[n].shape != shadow[n].shape)
        raise ValueError(
            f"{ema_file} does not match the model of {path / 'config.yaml'}: "
            f"missing {sorted(set(params) - set(shadow))}, unexpected {sorted(set(shadow) - set(params))}, "
            f"shape-mismatched {mismatched}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(shadow[name])
    return model.to(device).eval()


def _load_any(source: RoundStudent, device: torch.device) -> DiT:
    if (source.path / "ema").is_dir():
        return load_checkpoint_student(source.path, device=device)
    from ddistill.models.checkpoints import load_pretrained

    overrides = {"autocast_dtype": "bfloat16" if device.type == "cuda" else "float32"}
    return load_pretrained(source.path, overrides=overrides)[0].to(device).eval()


def evaluate_rounds(
    students: Sequence[RoundStudent],
    steps_list: Sequence[int],
    *,
    out_dir: str | Path,
    judge_name: str,
    num_samples: int,
    batch_size: int,
    length: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
    schedule: str = "loglinear",
    schedule_eps: float = 1e-3,
    t_end: float = 1e-5,
    nucleus_p: float = 1.0,
    reference_texts: Sequence[str] | None = None,
    mauve_num_prompts: int = 1024,
    judge_batch_size: int = 8,
    stem: str = "sdtt_rounds",
) -> list[EvalRow]:
    """Sample every student at every T of `steps_list` (float64 ancestral sampling, MDLM cache) and write one report.

    Returns the rows on rank 0 ([] elsewhere). `reference_texts` (human documents) turns on MAUVE of 50-token
    prompt continuations on a 100-token canvas (the paper's protocol; see `evaluate_sampler`).
    """
    import torch.distributed as dist

    from ddistill.data.tokenizer import MASK_ID, get_tokenizer
    from ddistill.eval.judge import load_judge

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    judge = load_judge(judge_name, device=device) if rank == 0 else None
    tokenizer = get_tokenizer()
    rows: list[EvalRow] = []
    for student in students:
        model = _load_any(student, device)
        if model.vocab_size != MASK_ID + 1:
            raise ValueError(
                f"{student.path}: vocabulary of {model.vocab_size} ids; the GPT-2 models have {MASK_ID + 1}"
            )
        rows += evaluate_sampler(
            model,
            process="absorbing",
            steps_list=steps_list,
            num_samples=num_samples,
            batch_size=batch_size,
            judge=judge,
            tokenizer=tokenizer,
            seed=seed,
            out_dir=out_dir,
            label=student.label,
            length=length,
            vocab_size=model.vocab_size,
            schedule=build_schedule(schedule, eps=schedule_eps),
            mask_id=MASK_ID,
            device=device,
            sampler_kwargs={
                "nucleus_p": nucleus_p,
                "t_end": t_end,
                "cached": not model.config.time_conditioning,
                "time_conditioning": model.config.time_conditioning,
            },
            judge_batch_size=judge_batch_size,
            reference_texts=reference_texts,
            mauve_num_prompts=mauve_num_prompts,
            rank=rank,
            world_size=world_size,
            all_gather_fn=all_gather if world_size > 1 else None,
            stem=stem,
        )
        del model
    return rows


def _reference_texts(run_dir: Path, count: int) -> list[str]:
    """The first `count` validation documents of the run's dataset (OWT: the last 100k documents of train)."""
    from ddistill.data import DataConfig, load_documents

    students = sorted((run_dir / "checkpoints").glob("step_*/config.yaml"))
    if not students:
        raise FileNotFoundError(f"no checkpoint config under {run_dir}/checkpoints for the MAUVE reference texts")
    data_cfg = DataConfig(**load_yaml(students[-1])["data"])
    docs = load_documents(data_cfg, "validation")
    return list(docs.select(range(min(count, len(docs))))["text"])


def main(argv: Sequence[str] | None = None) -> list[EvalRow]:
    parser = argparse.ArgumentParser(prog="python -m ddistill.eval.rounds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="training run (train.out_dir) whose round students to evaluate")
    parser.add_argument("--student", action="append", default=[], metavar="LABEL=PATH",
                        help="extra model: a training checkpoint dir or a public checkpoint (repeatable)")
    parser.add_argument("--teacher", help="the initial teacher (public checkpoint / hub id), label 'teacher'")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 1024])
    parser.add_argument("--rounds", type=int, nargs="*", help="only these rounds (1-based)")
    parser.add_argument("--out-dir", type=Path, help="default: <run-dir>/eval_rounds")
    parser.add_argument("--judge", default="gpt2-large", help="gpt2-large (the papers'), smollm2 (offline) or a path")
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nucleus-p", type=float, default=1.0)
    parser.add_argument("--mauve-docs", type=int, default=0,
                        help="MAUVE with this many validation documents of the run's dataset as prompts (0 = off)")
    args = parser.parse_args(argv)

    students = []
    if args.teacher:
        students.append(RoundStudent(label="teacher", path=Path(args.teacher), trained_steps=None))
    if args.run_dir:
        found = find_round_students(args.run_dir)
        if args.rounds:
            found = [s for s in found if int(s.label.split()[1]) in set(args.rounds)]
        students += found
    for spec in args.student:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--student {spec!r}: expected LABEL=PATH")
        students.append(RoundStudent(label=label, path=Path(path), trained_steps=None))
    if not students:
        raise SystemExit("nothing to evaluate: give --run-dir, --teacher and/or --student")
    out_dir = args.out_dir or (args.run_dir / "eval_rounds" if args.run_dir else None)
    if out_dir is None:
        raise SystemExit("--out-dir is required without --run-dir")

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    references = _reference_texts(args.run_dir, args.mauve_docs) if args.mauve_docs and args.run_dir else None
    try:
        rows = evaluate_rounds(
            students,
            args.steps,
            out_dir=out_dir,
            judge_name=args.judge,
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            length=args.length,
            seed=args.seed,
            nucleus_p=args.nucleus_p,
            reference_texts=references,
            mauve_num_prompts=max(args.mauve_docs, 1),
        )
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    for student in students:
        trained = f" (distilled for {student.trained_steps} steps)" if student.trained_steps else ""
        if rows:
            print(f"{student.label}: {student.path}{trained}")
    if rows:
        print(f"report: {out_dir}/sdtt_rounds.md, .csv, .png")
    return rows


if __name__ == "__main__":
    main()
