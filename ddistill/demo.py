"""`ddistill demo` (what `make demo` runs): the whole pipeline on the embedded "classics" corpus.

1. fetch and tokenise the corpus (Austen, KJV, Shakespeare; one held-out work per source);
2. train a small teacher and export its EMA weights in the public HF layout: an MDLM (`mdlm`, the default
   `method=sdtt` pipeline) or a uniform-state DUO model trained with the Gaussian curriculum (`method=duo`);
3. distill it with the pipeline's distillation methods (SDTT, or DCD for DUO), round by round: each method lists
   the students of its run (`Method.eval_students`: one per round boundary) and each is exported;
4. sample the teacher and every student at several step counts with the sampler its method names (MDLM or DUO
   ancestral; `tails` adds DUO's greedy tail) and score Gen-PPL (offline judge SmolLM2-135M, retokenised) and
   unigram entropy, each with a 95% bootstrap interval over the samples, and each student's Gen-PPL over the
   teacher's at the same steps with its interval (paired: every model draws from the same seeds; ``num_samples``
   a cell, ``num_samples_at`` per step count where it differs); print the table and save the CSV,
   Markdown and a plot of Gen-PPL / entropy against steps with error bars (one curve per model and tail), the
   decoded samples (`samples/<curve>_T<steps>.jsonl`, `samples.md`), and print a few of them side by side.

Each round's student is exported from that round's own checkpoint (`checkpoints/step_<r·S>`, EMA weights), so a
second run into the same out_dir resumes: finished stages are not trained again, and it re-samples and re-scores
with every label on its own weights. Samples are drawn with seeds fixed by (seed, steps, batch), and CPU training
with one torch thread is bitwise reproducible (checked over 20 steps), so two fresh runs with the same seed should
then give the same table. With
several threads it is not (the weights drift apart in the last bits from the first steps on; the op was not found),
so two runs give tables that differ within their intervals.

The CPU profile is sized so that the claim shows on 2 cores: the classics BPE of 512 ids
(`data.tokenizer=classics-bpe-512`: a cheap output layer and words of several ids, the local dependencies a
few-step sampler loses) and blocks of 16 tokens, so that a 128-wide 2-block DiT leaves the unigram plateau within a
few hundred steps (on 64-token blocks it stays there for thousands); samples are decoded with the tokenizer each
checkpoint records.

Profiles (configs/demo/*.yaml) size the job: `cpu` fits in 10 minutes on 2 cores (its header gives the measured
time and table), `cpu_long` is the longer CPU run reported in the SDTT issue note, `gpu` a larger one for one GPU;
the DUO pipeline reads `duo_<profile>.yaml`.
`profile=auto` picks `gpu` when CUDA is available, else `cpu`. Any field can be overridden:

    ddistill demo                                  # auto profile, writes runs/demo
    ddistill demo method=duo                       # DUO teacher with curriculum -> DCD rounds, writes runs/demo_duo
    ddistill demo method=dimo                      # MDLM teacher -> DiMO one-step generator (profiles dimo_<name>)
    ddistill demo profile=cpu out_dir=/tmp/demo teacher.overrides='[train.max_steps=50]'
    ddistill demo judge=none                       # sample only; score later with `ddistill demo stage=score`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from ddistill.config import ConfigError, apply_overrides, from_dict, load_yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "configs" / "demo"


@dataclass(kw_only=True)
class RunSpec:
    """One training run: a config file (relative to the repository) and dotted overrides."""

    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class DistillSpec(RunSpec):
    """A distillation run. A multi-round method (SDTT, DCD): num_rounds and steps_per_round set the shared round
    schedule (methods/rounds.py), one student per round boundary. A single-run method (DiMO): max_steps is the run's
    length and its student is the run's final export; the round fields are then not passed to the method."""

    num_rounds: int = 2
    steps_per_round: int = 100
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"distill.*.max_steps={self.max_steps} must be >= 1")


DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PIPELINES = ("sdtt", "duo", "dimo")  # teacher -> distillation: MDLM -> SDTT (profiles <name>.yaml), DUO -> DCD (duo_<name>)
TAILS = ("ancestral", "greedy")


@dataclass(kw_only=True)
class DemoConfig:
    method: Literal["sdtt", "duo", "dimo"] = "sdtt"  # the pipeline; picks the profile family
    profile: str = "auto"  # auto | the name of a profile of the pipeline in configs/demo
    out_dir: str = "runs/demo"
    stage: Literal["all", "train", "sample", "score"] = "all"
    teacher: RunSpec
    distill: dict[str, DistillSpec] = field(default_factory=dict)
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    num_samples: int = 16  # samples a cell (model × step count)
    # step count -> samples of its cells, instead of num_samples (a profile puts more where its claim is read)
    num_samples_at: dict[int, int] = field(default_factory=dict)
    batch_size: int = 16
    seed: int = 0
    judge: str = "smollm2"  # "none": only sample (e.g. on a GPU box without the judge); score later
    judge_batch_size: int = 8
    tails: list[str] = field(default_factory=lambda: ["ancestral"])  # final sampling steps; several: one curve each

    def __post_init__(self) -> None:
        bad = sorted(set(self.tails) - set(TAILS))
        if bad or not self.tails:
            raise ConfigError(f"tails: {list(self.tails)} is not allowed; choose one or more of {list(TAILS)}")
        if not self.steps or min(self.steps) < 1 or len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"steps: {list(self.steps)} must be distinct step counts >= 1, at least one")
        for key in ("num_samples", "batch_size", "judge_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        small = {k: v for k, v in self.num_samples_at.items() if v < 1}
        if small:
            raise ConfigError(f"num_samples_at: {small} must be >= 1")

    def samples_at(self, steps: int) -> int:
        """The number of samples of every cell at `steps` sampling steps."""
        return self.num_samples_at.get(steps, self.num_samples)

    def sample_counts_line(self) -> str:
        """The samples a cell at each step count, and the num_samples_at entries that match no step count (a
        profile's, after `steps` was overridden): said, not silently dropped."""
        counts = ", ".join(f"T={steps}: {self.samples_at(steps)}" for steps in self.steps)
        stray = sorted(set(self.num_samples_at) - set(self.steps))
        unused = f" (num_samples_at for {stray} unused: not in steps)" if stray else ""
        return f"[demo] samples a cell: {counts}{unused}"


def _profile_file(method: str, profile: str) -> str:
    return profile if method == "sdtt" else f"{method}_{profile}"


def resolve_profile(argv: Sequence[str]) -> DemoConfig:
    data = apply_overrides({}, list(argv))
    method = data.get("method", "sdtt")
    if method not in PIPELINES:
        raise ConfigError(f"method: {method!r} is not allowed; choose one of {list(PIPELINES)}")
    profile = data.get("profile", "auto")
    stems = {p.stem for p in PROFILES_DIR.glob("*.yaml")}
    known = sorted(n for n in ("cpu", "cpu_long", "gpu", *stems) if _profile_file(method, n) in stems)
    if profile != "auto" and profile not in known:
        raise ConfigError(f"profile: {profile!r} is not allowed for method={method}; choose one of {['auto', *known]}")
    if profile == "auto":
        profile = "gpu" if torch.cuda.is_available() else "cpu"
    base = load_yaml(PROFILES_DIR / f"{_profile_file(method, profile)}.yaml")
    cfg = from_dict(DemoConfig, apply_overrides(base, list(argv)))
    return dataclasses.replace(cfg, profile=profile)


def _train(spec: RunSpec, out_dir: Path, extra: Sequence[str]) -> dict:
    """Run one training job (auto-resumes from out_dir/checkpoints) and return its summary.

    Each job is its own process, `python -m ddistill.engine CONFIG overrides...`, exactly what a user launches: the
    distributed state of one run (process group, DeepSpeed's communication backend) is then never reused.
    """
    from ddistill.engine.run_config import load_run_config

    overrides = [*spec.overrides, f"train.out_dir={out_dir}", *extra]
    load_run_config(ROOT / spec.config, overrides)  # a bad config fails here, before any work
    cmd = [sys.executable, "-m", "ddistill.engine", str(ROOT / spec.config), *overrides]
    summary = None
    # A fresh single-process job: no distributed variables of the calling process (an in-process trainer sets
    # MASTER_ADDR/PORT for its own process group; inherited, the job would try to bind the same port).
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARIABLES}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith("SUMMARY "):
                summary = json.loads(line[len("SUMMARY "):])
            else:
                print(line, end="", flush=True)
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"training in {out_dir} failed (exit code {proc.returncode}): {shlex.join(cmd)}")
    if summary["stop_reason"] != "max_steps":
        raise RuntimeError(f"training in {out_dir} stopped early: {summary['stop_reason']}")
    return summary


def _method_of(spec: RunSpec, extra: Sequence[str]):
    """The method object of a run (what it trains and which students it produces), from its config."""
    from ddistill.engine.run_config import load_run_config
    from ddistill.methods import get_method

    cfg = load_run_config(ROOT / spec.config, [*spec.overrides, "train.out_dir=unused", *extra])
    vocab = cfg.model.vocab_size
    return get_method(cfg.method.name)(cfg.method.config, vocab_size=vocab, mask_id=vocab - 1)


def _finished_export(run_dir: Path, spec: RunSpec, network: str) -> str | None:
    """The export of a run that already reached its max_steps (complete checkpoint + export of `network`), else None."""
    from ddistill.engine.run_config import load_run_config

    max_steps = load_run_config(ROOT / spec.config, [*spec.overrides, f"train.out_dir={run_dir}"]).train.max_steps
    export = run_dir / "export" / network
    done = (run_dir / "checkpoints" / f"step_{max_steps:08d}" / "MANIFEST.json").is_file()
    return str(export) if done and (export / "config.json").is_file() else None


def _export_student(checkpoint: Path, network: str, sampler: str, dest: Path) -> None:
    """Write the EMA `network` of a training checkpoint to `dest` in the public layout, with its tokenizer's name."""
    from ddistill.eval.rounds import load_checkpoint_student
    from ddistill.models.checkpoints import checkpoint_tokenizer, save_pretrained

    model = load_checkpoint_student(checkpoint, network=network, device="cpu")
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    flavor = "mdlm" if sampler == "mdlm" else "duo"
    save_pretrained(model, tmp, flavor=flavor, tokenizer=checkpoint_tokenizer(checkpoint))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def train_models(cfg: DemoConfig, out: Path) -> dict[str, dict]:
    """Teacher, then each distillation method student by student; returns {label: {path, sampler}} of the exports.

    A stage whose checkpoint is already complete (an earlier run into the same out_dir) is not trained again.
    Every student is exported from the checkpoint of its own step, never from the run's latest state.
    """
    from ddistill.eval.rounds import run_students

    models: dict[str, dict] = {}
    (teacher,) = _method_of(cfg.teacher, []).eval_students()[-1:]  # the finished run's export
    export = _finished_export(out / "teacher", cfg.teacher, teacher.network)
    if export is None:
        summary = _train(cfg.teacher, out / "teacher", [])
        export = summary["export"]
        print(f"[demo] teacher: {summary['step']} steps, {summary['tokens_per_s_per_rank']:.0f} tokens/s/rank, "
              f"exported to {export}", flush=True)
    else:
        print(f"[demo] teacher: finished earlier, {export}", flush=True)
    models["teacher"] = {"path": export, "sampler": teacher.sampler}
    for method, spec in cfg.distill.items():
        rounds = [f"init_from={models['teacher']['path']}"]
        if spec.max_steps is None:
            rounds += [f"method.num_rounds={spec.num_rounds}", f"method.steps_per_round={spec.steps_per_round}"]
        students = _method_of(spec, rounds).eval_students()
        for student in students:
            label = f"{method} {student.label}" if student.label != method else method
            if student.step is None:  # a single-run method: its student is the finished run's export
                if spec.max_steps is None:
                    raise ValueError(f"demo: method {method!r} lists a student without a training step "
                                     f"({student.label}); set distill.{method}.max_steps")
                export = _finished_export(out / method, RunSpec(config=spec.config, overrides=[
                    *spec.overrides, *rounds, f"train.max_steps={spec.max_steps}"]), student.network)
                if export is None:
                    summary = _train(spec, out / method, [*rounds, f"train.max_steps={spec.max_steps}",
                                                          f"train.ckpt_every={spec.max_steps}"])
                    export = summary["export"]
                    print(f"[demo] {label}: {summary['step']} steps, {summary['tokens_per_s_per_rank']:.0f} "
                          f"tokens/s/rank", flush=True)
                else:
                    print(f"[demo] {label}: finished earlier, {export}", flush=True)
                dest = out / "students" / _safe(label)
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(export, dest)
                models[label] = {"path": str(dest), "sampler": student.sampler}
                continue
            checkpoint = out / method / "checkpoints" / f"step_{student.step:08d}"
            if (checkpoint / "MANIFEST.json").is_file():
                print(f"[demo] {label}: finished earlier, {checkpoint}", flush=True)
            else:
                # Each call resumes the same run (same out_dir) and trains to the student's step; the boundary
                # checkpoints are kept (keep_last) so that each student can be exported from its own.
                summary = _train(spec, out / method, [*rounds, f"train.max_steps={student.step}",
                                                      f"train.ckpt_every={student.step}",
                                                      f"train.keep_last={len(students) + 1}"])
                print(f"[demo] {label}: step {summary['step']}, {summary['tokens_per_s_per_rank']:.0f} "
                      f"tokens/s/rank", flush=True)
            (found,) = run_students(out / method, [student])  # its complete checkpoint, or an error naming it
            dest = out / "students" / _safe(label)
            _export_student(found.path, student.network, student.sampler, dest)
            models[label] = {"path": str(dest), "sampler": student.sampler, "checkpoint": str(found.path)}
    (out / "models.json").write_text(json.dumps(models, indent=1))
    return models


def _curves(cfg: DemoConfig, models: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(curve label, model label, tail) for every model and tail; with one tail the curve is the model's label."""
    return [(label if len(cfg.tails) == 1 else f"{label} {tail}", label, tail) for label in models
            for tail in cfg.tails]


def sample_models(cfg: DemoConfig, out: Path, models: dict[str, dict]) -> None:
    """Samples of every model and tail at every step count, saved as token ids (samples/<curve>/steps_<T>.pt)."""
    from ddistill.diffusion import LogLinearSchedule, sample_dimo, sample_duo, sample_mdlm
    from ddistill.eval.sample_eval import sampling_progress
    from ddistill.models.checkpoints import checkpoint_tokenizer, load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for curve, label, tail in _curves(cfg, models):
        model, mcfg = load_pretrained(models[label]["path"], overrides={"dropout": 0.0})
        model = model.to(device)
        tokenizer = checkpoint_tokenizer(models[label]["path"])  # named in each sample file: scoring needs no weights
        sampler = models[label]["sampler"]
        batches = sum(-(-cfg.samples_at(steps) // cfg.batch_size) for steps in cfg.steps)
        bar = sampling_progress(batches, desc=f"sampling {curve}")
        for steps in cfg.steps:
            tokens, nfe, start = [], 0, time.perf_counter()
            for first in range(0, cfg.samples_at(steps), cfg.batch_size):
                batch = min(cfg.batch_size, cfg.samples_at(steps) - first)
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + steps * 10_007 + first)
                common = dict(batch_size=batch, length=mcfg.length, num_steps=steps, vocab_size=mcfg.vocab_size,
                              schedule=LogLinearSchedule(), generator=gen, device=device,
                              greedy_tail=tail == "greedy")
                if sampler == "mdlm":
                    result = sample_mdlm(model, mask_id=mcfg.vocab_size - 1, cached=not mcfg.time_conditioning,
                                         time_conditioning=mcfg.time_conditioning, row_logits=True, **common)
                elif sampler == "duo":
                    result = sample_duo(model, **common)
                elif sampler == "dimo":  # the DiMO training defaults of x_init and the embedding noise
                    for key in ("schedule", "greedy_tail"):
                        common.pop(key)
                    result = sample_dimo(model, mask_id=mcfg.vocab_size - 1, embed_dim=mcfg.hidden_size,
                                         noise_rms=model.input_embedding_rms(), **common)
                else:
                    raise ValueError(f"demo: {label} names sampler {sampler!r}; the demo samples 'mdlm', 'duo' and 'dimo'")
                tokens.append(result.tokens.cpu())
                nfe += result.nfe
                bar.update(1)
            seconds = time.perf_counter() - start
            target = _sample_file(out, curve, steps)
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"label": curve, "steps": steps, "tokens": torch.cat(tokens), "nfe": nfe / len(tokens),
                        "seconds": seconds, "device": _device_name(device), "vocab_size": mcfg.vocab_size,
                        "tokenizer": tokenizer, "draws": _draws(cfg, device, steps)}, target)
        bar.close()
        print(f"[demo] sampled {curve} at steps {cfg.steps}", flush=True)


def _draws(cfg: DemoConfig, device: torch.device, steps: int) -> dict:
    """What fixes the random numbers of a sample set: batch b's generator is seeded from (seed, steps, first index),
    so two sets with equal draws at the same steps and length consumed the same random numbers sample by sample
    (the samplers draw the same uniforms whatever the model predicts)."""
    return {"seed": cfg.seed, "batch_size": cfg.batch_size, "num_samples": cfg.samples_at(steps),
            "generator": f"torch.Generator({device.type})"}


def score_samples(cfg: DemoConfig, out: Path) -> list:
    """Gen-PPL and entropy (95% bootstrap intervals over samples) of every saved sample set; writes the decoded texts
    (samples/<curve>_T<steps>.jsonl, samples.md) and demo.csv / demo.md / demo.png, and returns the rows.

    The sample files name their tokenizer and vocabulary, so scoring needs no model weights (samples drawn on a GPU
    node can be scored elsewhere from the samples and models.json alone); older sample files fall back to the
    checkpoint."""
    from ddistill.data.tokenizer import check_vocab_size, get_tokenizer
    from ddistill.eval.decode import decode_samples, load_model_tokenizer
    from ddistill.eval.judge import load_judge
    from ddistill.eval.metrics import gen_ppl_interval, mean_interval, unigram_entropy_per_sample
    from ddistill.eval.report import EvalRow, markdown_table, write_report
    from ddistill.eval.sample_eval import write_samples_jsonl, write_samples_markdown
    from ddistill.models.checkpoints import load_pretrained

    models = json.loads((out / "models.json").read_text())
    for curve, _, _ in _curves(cfg, models):  # before the judge loads
        for steps in cfg.steps:
            path = _sample_file(out, curve, steps)
            if not path.is_file():
                raise FileNotFoundError(f"no samples of {curve} at {steps} steps ({path}): run stage=sample (or all) "
                                        f"with steps={list(cfg.steps)} first")
    judge = load_judge(cfg.judge)
    rows, texts_of, scores, draws = [], {}, {}, {}
    for curve, label, _ in _curves(cfg, models):
        fallback_tokenizer = None  # older sample files name no tokenizer: read it from the checkpoint, once
        for steps in cfg.steps:
            saved = torch.load(_sample_file(out, curve, steps), weights_only=False)
            if "tokenizer" in saved:
                check_vocab_size(saved["tokenizer"], saved["vocab_size"], what=f"the samples of {curve}")
                tokenizer = get_tokenizer(saved["tokenizer"])
            else:
                if fallback_tokenizer is None:
                    vocab_size = load_pretrained(models[label]["path"])[1].vocab_size
                    fallback_tokenizer = load_model_tokenizer(models[label]["path"], vocab_size)
                tokenizer = fallback_tokenizer
            texts = decode_samples(saved["tokens"], tokenizer, mask_id=tokenizer.mask_token_id)
            texts_of[curve, steps] = texts
            write_samples_jsonl(out / "samples" / f"{_safe(curve)}_T{steps}.jsonl", texts)
            nll_sums, token_counts = judge.score_texts_per_sample(texts, batch_size=cfg.judge_batch_size)
            if int(token_counts.sum()) == 0:
                raise ValueError(f"demo: {curve} at T={steps}: the judge found no valid tokens in the samples")
            entropies = unigram_entropy_per_sample(saved["tokens"])
            scores[curve, steps] = nll_sums, token_counts
            draws[curve, steps] = saved.get("draws"), tuple(saved["tokens"].shape)
            ppl_lo, ppl_hi = gen_ppl_interval(nll_sums, token_counts, seed=cfg.seed)
            entropy_lo, entropy_hi = mean_interval(entropies, seed=cfg.seed)
            rows.append(EvalRow(label=curve, steps=steps, nfe=saved["nfe"],
                                gen_ppl=math.exp(float(nll_sums.sum()) / int(token_counts.sum())),
                                gen_ppl_lo=ppl_lo, gen_ppl_hi=ppl_hi, entropy=float(entropies.mean()),
                                entropy_lo=entropy_lo, entropy_hi=entropy_hi, num_samples=len(texts),
                                judge=cfg.judge, device=saved["device"], sample_seconds=saved["seconds"]))
    rows = _with_teacher_ratios(cfg, models, rows, scores, draws)
    paths = write_report(rows, out, stem="demo", merge=False)
    write_samples_markdown(out)
    print(markdown_table(rows))
    print(f"[demo] table {paths['md']}, plot {paths['png']}, samples {out / 'samples.md'}", flush=True)
    _print_side_by_side(cfg, models, texts_of)
    return rows


def _with_teacher_ratios(cfg: DemoConfig, models: dict[str, dict], rows: list, scores: dict, draws: dict) -> list:
    """Each student row with its Gen PPL over the teacher's at the same steps and tail (`ppl_ratio`, a bootstrap
    interval over both sample sets): below 1 by more than the interval when `ppl_ratio_hi` < 1.

    The demo draws every model's samples at a step count from the same seeds, so student sample i and teacher sample
    i share their random numbers (which positions unmask when, and the uniform of every token draw): common random
    numbers. Where both sample files record the same draws and shape, the interval resamples the pairs
    (`gen_ppl_ratio_interval(paired=True)`); otherwise (sample files from before the record, or from runs with other
    seeds) the two sets are resampled independently. `ppl_ratio_bootstrap` says which."""
    from ddistill.eval.metrics import gen_ppl_ratio_interval

    curves = _curves(cfg, models)
    teacher_label = curves[0][1]
    reference = {tail: curve for curve, label, tail in curves if label == teacher_label}
    tail_of = {curve: tail for curve, _, tail in curves}
    out = []
    for row in rows:
        ref = reference[tail_of[row.label]]
        if row.label != ref:
            mine, theirs = draws[row.label, row.steps], draws[ref, row.steps]
            paired = mine[0] is not None and mine == theirs
            ratio, lo, hi = gen_ppl_ratio_interval(*scores[row.label, row.steps], *scores[ref, row.steps], seed=cfg.seed,
                                                   paired=paired)
            row = dataclasses.replace(row, ppl_ratio=ratio, ppl_ratio_lo=lo, ppl_ratio_hi=hi,
                                      ppl_ratio_bootstrap="paired" if paired else "independent")
        out.append(row)
    return out


def _print_side_by_side(cfg: DemoConfig, models: dict[str, dict], texts_of: dict, count: int = 2,
                        max_chars: int = 300) -> None:
    """The first `count` samples of the teacher and of the last student at the fewest steps (same seeds)."""
    curves = _curves(cfg, models)
    steps = min(cfg.steps)
    shown = [curves[0][0]] + ([curves[-1][0]] if len(curves) > 1 else [])
    for i in range(count):
        for curve in shown:
            text = " ".join(texts_of[curve, steps][i].split())
            print(f"[demo] {curve}, {steps} steps, sample {i + 1}: {text[:max_chars]}")


def _sample_file(out: Path, curve: str, steps: int) -> Path:
    """Where the samples of one curve at one step count are saved (token ids and how they were drawn)."""
    return out / "samples" / _safe(curve) / f"steps_{steps}.pt"


def _safe(label: str) -> str:
    return label.replace(" ", "_")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_demo(cfg: DemoConfig) -> list:
    out = Path(cfg.out_dir).resolve()
    if cfg.stage not in ("all", "train") and not (out / "models.json").is_file():
        raise FileNotFoundError(f"{out} holds no trained models (models.json): stage={cfg.stage} needs a run of the "
                                "train stage there first (stage=all or stage=train)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    if cfg.stage in ("all", "train"):
        from ddistill.data.prepare import prepare

        prepare(_teacher_data(cfg), ("train",))
        train_models(cfg, out)
    models = json.loads((out / "models.json").read_text())
    if cfg.stage in ("all", "sample"):
        print(cfg.sample_counts_line(), flush=True)
        sample_models(cfg, out, models)
    if cfg.stage in ("all", "score") and cfg.judge != "none":
        rows = score_samples(cfg, out)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(f"[demo] done in {time.perf_counter() - start:.0f} s, {cpu:.0f} s of CPU time (this process and its "
          f"training processes; {cfg.profile} profile); results in {out}", flush=True)
    return rows


def _teacher_data(cfg: DemoConfig):
    """The teacher run's data config (corpus, tokenizer, block size): what the demo prepares before training."""
    from ddistill.engine.run_config import load_run_config

    return load_run_config(ROOT / cfg.teacher.config, [*cfg.teacher.overrides, "train.out_dir=unused"]).data


def demo_main(argv: Sequence[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_demo(resolve_profile(argv))  # a ConfigError becomes one line and exit code 2 in ddistill.cli
