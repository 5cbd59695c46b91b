"""`ddistill demo` (what `make demo` runs): the whole pipeline on the embedded "classics" corpus.

1. fetch and tokenise the corpus (Austen, KJV, Shakespeare; one held-out work per source);
2. train a small teacher and export its EMA weights in the public HF layout: an MDLM (`mdlm`, the default
   `method=sdtt` pipeline) or a uniform-state DUO model trained with the Gaussian curriculum (`method=duo`);
3. distill it with the pipeline's distillation methods (SDTT, or DCD for DUO), round by round: each method lists
   the students of its run (`Method.eval_students`: one per round boundary) and each is exported;
4. sample the teacher and every student at several step counts with the sampler its method names (MDLM or DUO
   ancestral; `tails` adds DUO's greedy tail) and score Gen-PPL (offline judge SmolLM2-135M, retokenised) and
   unigram entropy; print the table and save the CSV, Markdown and a plot of Gen-PPL / entropy against steps
   (one curve per model and tail).

Profiles (configs/demo/*.yaml) size the job: `cpu` fits in about 10 minutes on 2 cores, `cpu_long` is the longer CPU
run reported in the SDTT issue note, `gpu` a larger one for one GPU; the DUO pipeline reads `duo_<profile>.yaml`.
`profile=auto` picks `gpu` when CUDA is available, else `cpu`. Any field can be overridden:

    ddistill demo                                  # auto profile, writes runs/demo
    ddistill demo method=duo                       # DUO teacher with curriculum -> DCD rounds, writes runs/demo_duo
    ddistill demo profile=cpu out_dir=/tmp/demo teacher.overrides='[train.max_steps=50]'
    ddistill demo judge=none                       # sample only; score later with `ddistill demo stage=score`
"""

from __future__ import annotations

import dataclasses
import json
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
    """A distillation run; num_rounds and steps_per_round set the shared round schedule (methods/rounds.py)."""

    num_rounds: int = 2
    steps_per_round: int = 100


PIPELINES = ("sdtt", "duo")  # teacher -> distillation: MDLM -> SDTT (profiles <name>.yaml), DUO -> DCD (duo_<name>)
TAILS = ("ancestral", "greedy")


@dataclass(kw_only=True)
class DemoConfig:
    method: Literal["sdtt", "duo"] = "sdtt"  # the pipeline; picks the profile family
    profile: str = "auto"  # auto | the name of a profile of the pipeline in configs/demo
    out_dir: str = "runs/demo"
    stage: Literal["all", "train", "sample", "score"] = "all"
    teacher: RunSpec
    distill: dict[str, DistillSpec] = field(default_factory=dict)
    steps: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    num_samples: int = 16
    batch_size: int = 16
    seed: int = 0
    judge: str = "smollm2"  # "none": only sample (e.g. on a GPU box without the judge); score later
    judge_batch_size: int = 8
    tails: list[str] = field(default_factory=lambda: ["ancestral"])  # final sampling steps; several: one curve each

    def __post_init__(self) -> None:
        bad = sorted(set(self.tails) - set(TAILS))
        if bad or not self.tails:
            raise ConfigError(f"tails: {list(self.tails)} is not allowed; choose one or more of {list(TAILS)}")


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
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
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


def train_models(cfg: DemoConfig, out: Path) -> dict[str, dict]:
    """Teacher, then each distillation method student by student; returns {label: {path, sampler}} of the exports."""
    models: dict[str, dict] = {}
    summary = _train(cfg.teacher, out / "teacher", [])
    (teacher,) = _method_of(cfg.teacher, []).eval_students()[-1:]  # the finished run's export
    models["teacher"] = {"path": summary["export"], "sampler": teacher.sampler}
    print(f"[demo] teacher: {summary['step']} steps, {summary['tokens_per_s_per_rank']:.0f} tokens/s/rank, "
          f"exported to {summary['export']}", flush=True)
    for method, spec in cfg.distill.items():
        rounds = [f"init_from={models['teacher']['path']}", f"method.num_rounds={spec.num_rounds}",
                  f"method.steps_per_round={spec.steps_per_round}"]
        for student in _method_of(spec, rounds).eval_students():
            if student.step is None:
                raise ValueError(f"demo: method {method!r} lists a student without a training step ({student.label})")
            # Each call resumes the same run (same out_dir), trains to the student's step, then exports.
            summary = _train(spec, out / method, [*rounds, f"train.max_steps={student.step}",
                                                  f"train.ckpt_every={student.step}"])
            label = f"{method} {student.label}"
            dest = out / "students" / _safe(label)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(summary["export"], dest)
            models[label] = {"path": str(dest), "sampler": student.sampler}
            print(f"[demo] {label}: step {summary['step']}, {summary['tokens_per_s_per_rank']:.0f} tokens/s/rank",
                  flush=True)
    (out / "models.json").write_text(json.dumps(models, indent=1))
    return models


def _curves(cfg: DemoConfig, models: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(curve label, model label, tail) for every model and tail; with one tail the curve is the model's label."""
    return [(label if len(cfg.tails) == 1 else f"{label} {tail}", label, tail) for label in models
            for tail in cfg.tails]


def sample_models(cfg: DemoConfig, out: Path, models: dict[str, dict]) -> None:
    """Samples of every model and tail at every step count, saved as token ids (samples/<curve>/steps_<T>.pt)."""
    from ddistill.diffusion import LogLinearSchedule, sample_duo, sample_mdlm
    from ddistill.models.checkpoints import load_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for curve, label, tail in _curves(cfg, models):
        model, mcfg = load_pretrained(models[label]["path"], overrides={"dropout": 0.0})
        model = model.to(device)
        sampler = models[label]["sampler"]
        for steps in cfg.steps:
            tokens, nfe, start = [], 0, time.perf_counter()
            for first in range(0, cfg.num_samples, cfg.batch_size):
                batch = min(cfg.batch_size, cfg.num_samples - first)
                gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + steps * 10_007 + first)
                common = dict(batch_size=batch, length=mcfg.length, num_steps=steps, vocab_size=mcfg.vocab_size,
                              schedule=LogLinearSchedule(), generator=gen, device=device,
                              greedy_tail=tail == "greedy")
                if sampler == "mdlm":
                    result = sample_mdlm(model, mask_id=mcfg.vocab_size - 1, cached=not mcfg.time_conditioning,
                                         time_conditioning=mcfg.time_conditioning, **common)
                elif sampler == "duo":
                    result = sample_duo(model, **common)
                else:
                    raise ValueError(f"demo: {label} names sampler {sampler!r}; the demo samples 'mdlm' and 'duo'")
                tokens.append(result.tokens.cpu())
                nfe += result.nfe
            seconds = time.perf_counter() - start
            target = out / "samples" / _safe(curve) / f"steps_{steps}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"label": curve, "steps": steps, "tokens": torch.cat(tokens), "nfe": nfe / len(tokens),
                        "seconds": seconds, "device": _device_name(device)}, target)
        print(f"[demo] sampled {curve} at steps {cfg.steps}", flush=True)


def score_samples(cfg: DemoConfig, out: Path) -> list:
    """Gen-PPL and entropy of every saved sample set; writes demo.csv / demo.md / demo.png and returns the rows."""
    from ddistill.data.tokenizer import MASK_ID, get_tokenizer
    from ddistill.eval.decode import decode_samples
    from ddistill.eval.judge import load_judge
    from ddistill.eval.metrics import gen_ppl, unigram_entropy
    from ddistill.eval.report import EvalRow, markdown_table, write_report

    judge = load_judge(cfg.judge)
    tokenizer = get_tokenizer()
    models = json.loads((out / "models.json").read_text())
    rows = []
    for label, _, _ in _curves(cfg, models):
        for steps in cfg.steps:
            saved = torch.load(out / "samples" / _safe(label) / f"steps_{steps}.pt", weights_only=False)
            texts = decode_samples(saved["tokens"], tokenizer, mask_id=MASK_ID)
            rows.append(EvalRow(label=label, steps=steps, nfe=saved["nfe"],
                                gen_ppl=gen_ppl(texts, judge, batch_size=cfg.judge_batch_size),
                                entropy=unigram_entropy(saved["tokens"]), num_samples=len(texts), judge=cfg.judge,
                                device=saved["device"], sample_seconds=saved["seconds"]))
    paths = write_report(rows, out, stem="demo", merge=False)
    print(markdown_table(rows))
    print(f"[demo] table {paths['md']}, plot {paths['png']}", flush=True)
    return rows


def _safe(label: str) -> str:
    return label.replace(" ", "_")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_demo(cfg: DemoConfig) -> list:
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    if cfg.stage in ("all", "train"):
        from ddistill.data.corpora import DataConfig
        from ddistill.data.prepare import prepare

        prepare(DataConfig(dataset="classics", block_size=_block_size(cfg)))
        train_models(cfg, out)
    models = json.loads((out / "models.json").read_text())
    if cfg.stage in ("all", "sample"):
        sample_models(cfg, out, models)
    if cfg.stage in ("all", "score") and cfg.judge != "none":
        rows = score_samples(cfg, out)
    print(f"[demo] done in {time.perf_counter() - start:.0f} s ({cfg.profile} profile); results in {out}", flush=True)
    return rows


def _block_size(cfg: DemoConfig) -> int:
    from ddistill.engine.run_config import load_run_config

    return load_run_config(ROOT / cfg.teacher.config, [*cfg.teacher.overrides, "train.out_dir=unused"]).data.block_size


def demo_main(argv: Sequence[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        cfg = resolve_profile(argv)
    except ConfigError as err:
        sys.exit(f"ddistill demo: configuration error: {err}")
    run_demo(cfg)
