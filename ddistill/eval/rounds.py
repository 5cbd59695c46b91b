"""Evaluate the students of a (multi-round) distillation run on one table and plot (SDTT arXiv 2410.21035 §4,
Figs. 1-2; DUO/DCD arXiv 2506.10892 Table 3).

Which models a run produced is the method's knowledge: the caller (``ddistill rounds``, the demo) asks the run's
method (`Method.eval_students`, e.g. SDTT/DCD: round r's student is the checkpoint at step r·steps_per_round) and
hands the list here; `run_students` maps each listed student (label, step, network, sampler, trained_steps) to its
files: the training checkpoint ``checkpoints/step_<step>`` (EMA weights ``ema/<network>.pt``) or, for step None, the
run's public-layout export ``export/<network>``. Each student is sampled with its sampler family — "mdlm" (float64
ancestral, MDLM cache) or "duo" (uniform-state ancestral) — with each of the requested final steps
(`tails`: "ancestral" and/or "greedy", the Greedy-Tail of DUO), and scored by `evaluate_sampler` at every T of a
common list of step counts. All rows go to ``{stem}.csv/.md/.png`` in ``out_dir``: Gen PPL and entropy vs T, one
curve per student and tail (MAUVE in the table when reference texts are given).

This module reads the engine's checkpoint *files* and imports neither the engine nor the methods. Data parallel
under torchrun: every rank samples its share, rank 0 scores and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ddistill.config import load_yaml
from ddistill.diffusion.schedules import build_schedule
from ddistill.eval.report import EvalRow
from ddistill.eval.sample_eval import evaluate_sampler
from ddistill.models.dit import DiT, build_model

__all__ = ["RoundStudent", "run_students", "load_checkpoint_student", "evaluate_rounds", "reference_texts",
           "SAMPLERS", "TAILS"]

SAMPLERS = {"mdlm": "absorbing", "duo": "uniform"}  # sampler family -> diffusion process of `evaluate_sampler`
TAILS = ("ancestral", "greedy")


class ListedStudent(Protocol):
    """What a method lists (`ddistill.methods.base.EvalStudent`), seen without importing the methods."""

    label: str
    step: int | None
    network: str
    sampler: str
    trained_steps: int | None


@dataclass(frozen=True)
class RoundStudent:
    label: str  # "round r" (1-based), "teacher" or a user label
    path: Path  # a training checkpoint directory (step_XXXXXXXX) or a public checkpoint
    sampler: str = "mdlm"  # "mdlm" | "duo"
    trained_steps: int | None = None  # the sampling steps this student was distilled for, when known
    network: str = "student"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{self.label}: sampler {self.sampler!r} has no evaluator here; allowed: {list(SAMPLERS)}")


def run_students(run_dir: str | Path, listed: Sequence[ListedStudent]) -> list[RoundStudent]:
    """The files of the students a method listed for the run in `run_dir`; a student whose checkpoint is missing
    or unfinished (no MANIFEST.json) is left out, and none at all is an error."""
    run_dir = Path(run_dir)
    found = []
    for student in listed:
        if student.step is None:
            path = run_dir / "export" / student.network
            complete = (path / "config.json").is_file()
        else:
            path = run_dir / "checkpoints" / f"step_{int(student.step):08d}"
            complete = (path / "MANIFEST.json").is_file()
        if complete:
            found.append(RoundStudent(label=student.label, path=path, sampler=student.sampler,
                                      trained_steps=student.trained_steps, network=student.network))
    if not found:
        wanted = [s.label + (f" (step {s.step})" if s.step is not None else " (export)") for s in listed]
        raise FileNotFoundError(f"none of the students {wanted} has a complete checkpoint under {run_dir}")
    return found


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
        return load_checkpoint_student(source.path, network=source.network, device=device)
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
    tails: Sequence[str] = ("ancestral",),
    reference_texts: Sequence[str] | None = None,
    mauve_num_prompts: int = 1024,
    judge_batch_size: int = 8,
    stem: str = "rounds",
) -> list[EvalRow]:
    """Sample every student at every T of `steps_list` with each final step of `tails` (float64 sampling; the MDLM
    cache for MDLM students without time conditioning) and write one report. With several tails a row's label is
    "<label> <tail>".

    Returns the rows on rank 0 ([] elsewhere). `reference_texts` (human documents) turns on MAUVE of 50-token
    prompt continuations on a 100-token canvas (the paper's protocol; see `evaluate_sampler`).
    """
    import torch.distributed as dist

    from ddistill.data.tokenizer import MASK_ID, get_tokenizer
    from ddistill.eval.judge import load_judge

    bad = sorted(set(tails) - set(TAILS))
    if bad or not tails:
        raise ValueError(f"tails={list(tails)}: choose one or more of {list(TAILS)}")
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
        process = SAMPLERS[student.sampler]
        for tail in tails:
            kwargs = {"nucleus_p": nucleus_p, "t_end": t_end, "greedy_tail": tail == "greedy"}
            if process == "absorbing":
                kwargs.update(cached=not model.config.time_conditioning,
                              time_conditioning=model.config.time_conditioning)
            rows += evaluate_sampler(
                model,
                process=process,
                steps_list=steps_list,
                num_samples=num_samples,
                batch_size=batch_size,
                judge=judge,
                tokenizer=tokenizer,
                seed=seed,
                out_dir=out_dir,
                label=student.label if len(tails) == 1 else f"{student.label} {tail}",
                length=length,
                vocab_size=model.vocab_size,
                schedule=build_schedule(schedule, eps=schedule_eps),
                mask_id=MASK_ID if process == "absorbing" else None,
                device=device,
                sampler_kwargs=kwargs,
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


def reference_texts(run_dir: Path, count: int) -> list[str]:
    """The first `count` validation documents of the run's dataset (OWT: the last 100k documents of train)."""
    from ddistill.data import DataConfig, load_documents

    configs = sorted((Path(run_dir) / "checkpoints").glob("step_*/config.yaml"))
    if not configs:
        raise FileNotFoundError(f"no checkpoint config under {run_dir}/checkpoints for the MAUVE reference texts")
    data_cfg = DataConfig(**load_yaml(configs[-1])["data"])
    docs = load_documents(data_cfg, "validation")
    return list(docs.select(range(min(count, len(docs))))["text"])
