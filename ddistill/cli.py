"""`ddistill` command line: train | sample | eval | rounds | prepare | demo | submit | jobs.

    ddistill train CONFIG.yaml key=value ...        # any registered method, 1 process or under any launcher
    ddistill sample CHECKPOINT --steps 64           # samples from a public-layout checkpoint (dir, .ckpt, hub id)
    ddistill eval CHECKPOINT --steps 8 16 32        # Gen-PPL / entropy (/ MAUVE) table and plot against steps
    ddistill rounds --run-dir RUN --teacher CKPT    # the same for every student a distillation run produced
    ddistill prepare dataset=classics block_size=128  # fetch, tokenise and cache a corpus
    ddistill demo key=value ...                     # the README's main job (see ddistill.demo)
    ddistill submit CONFIG.yaml key=value ... --launcher slurm|deepspeed|torchrun
    ddistill jobs runs/slurm                        # state, step and last loss of the submitted jobs

`ddistill COMMAND --help` explains each command. Exit codes (ddistill/exit_codes.py): 0 finished, 1 unexpected error,
2 bad input (one line, nothing overwritten), 3 training stopped on non-finite losses, 75 training preempted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from ddistill.exit_codes import ExitCode

COMMANDS = ("train", "sample", "eval", "rounds", "prepare", "demo", "submit", "jobs")


class BadInput(ValueError):
    """A command-line argument that cannot work: `main` prints the message as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`ddistill sample: argument --batch-size: must be >= 1, got 0`)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every flag's default; keeps the description's line breaks."""


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _number_where(ok, requirement: str):
    """An argparse type: a float for which ``ok(value)`` holds, else the one-line error "<requirement>, got <value>"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {value}")
        return value

    return parse


_probability = _number_where(lambda v: 0.0 < v <= 1.0, "must lie in (0, 1]")
_positive = _number_where(lambda v: 0.0 < v < float("inf"), "must be a finite number > 0")
_closed_unit = _number_where(lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]")


# owner/name[@revision], as ddistill.models.checkpoints fetches it with snapshot_download.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _exports_of(run_dir: Path) -> str:
    exports = sorted(p.parent for p in (run_dir / "export").glob("*/config.json"))
    if exports:
        return "sample its export instead: " + " or ".join(str(p) for p in exports)
    return (f"its run writes export/<network> in the public layout when it finishes (train.export_final=true); "
            f"{run_dir / 'export'} holds none yet")


def _check_checkpoint(text: str) -> None:
    """Refuse, with one line, a checkpoint argument that `load_pretrained` cannot read."""
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "MANIFEST.json").is_file() or (path / "trainer.pt").is_file()):
        raise BadInput(f"{text} is a training checkpoint (DeepSpeed state of every network), not a public-layout "
                       f"export; {_exports_of(path.parent.parent)}")
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / "config.json").is_file():
        raise BadInput(f"{text} is a training run directory, not a public-layout export; {_exports_of(path)}")
    if path.exists() or (_HUB_ID.match(text) and not _hub_offline()):
        return
    hub = " (nor fetched as a hub id: HF_HUB_OFFLINE is set)" if _HUB_ID.match(text) else ""
    raise BadInput(f"checkpoint {text} does not exist{hub}; expected a public-layout directory (config.json + "
                   "model.safetensors, e.g. a run's export/student), a Lightning .ckpt file or a hub id owner/name")


def _process_of(checkpoint: str, requested: str) -> str:
    """absorbing (MDLM/SDTT) or uniform (DUO): as requested, else from the HF config's model_type."""
    if requested != "auto":
        return requested
    config = Path(checkpoint) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in ("mdlm", "duo"):
            return "absorbing" if model_type == "mdlm" else "uniform"
    raise BadInput(f"cannot tell whether {checkpoint} is a masked (MDLM/SDTT) or uniform-state (DUO) model (its "
                   "config.json has no model_type mdlm/duo); pass --process absorbing or --process uniform")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def _load(args):
    from ddistill.models.checkpoints import load_pretrained

    overrides = {"dropout": 0.0}
    if args.time_conditioning is not None:
        overrides["time_conditioning"] = args.time_conditioning == "on"
    device = _device(args.device)
    model, cfg = load_pretrained(args.checkpoint, use_ema=args.ema, overrides=overrides)
    if args.length is not None and args.length > cfg.length:
        print(f"ddistill: warning: --length {args.length} is beyond the {cfg.length} tokens this model was trained on "
              "(its config's length); rotary positions extend, but samples past that length are out of distribution",
              file=sys.stderr)
    model = model.to(device)
    if args.compile:
        model.compile_blocks()
    return model, cfg


def _model_tokenizer(checkpoint: str, vocab_size: int):
    """The checkpoint's own tokenizer; a model/tokenizer vocabulary mismatch is one line, no traceback."""
    from ddistill.eval.decode import load_model_tokenizer

    try:
        return load_model_tokenizer(checkpoint, vocab_size)
    except ValueError as err:
        raise BadInput(str(err)) from None


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="public-layout checkpoint: HF directory (a run's export/<network>), Lightning "
                   ".ckpt, or hub id owner/name[@revision]")
    p.add_argument("--process", choices=("auto", "absorbing", "uniform", "dimo"), default="auto",
                   help="masked (MDLM/SDTT) or uniform-state (DUO) diffusion, or dimo: a DiMO generator (x_init + "
                        "embedding noise, re-mask the least confident per step); auto: from config.json's model_type")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a Lightning .ckpt")
    p.add_argument("--time-conditioning", choices=("on", "off"), default=None,
                   help="override when the checkpoint's config does not record it (None: as recorded)")
    p.add_argument("--length", type=_at_least(1), default=None,
                   help="tokens per sample (None: the model's training length)")
    p.add_argument("--num-samples", type=_at_least(1), default=8, help="samples to draw (per step count for eval)")
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="samples drawn together")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler's generator (same seed, same samples)")
    p.add_argument("--nucleus-p", type=_probability, default=1.0, help="top-p of each draw (1.0: the full softmax)")
    p.add_argument("--greedy-tail", action=argparse.BooleanOptionalAction, default=None,
                   help="argmax at the final step (None: on for DUO, off for MDLM)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--draw", choices=("auto", "fused", "torch"), default="auto",
                   help="MDLM/DUO draws: fused float64 Triton kernels, the float64 torch reference, or auto (fused on "
                        "CUDA when --nucleus-p is 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (regional) before sampling")
    dimo = p.add_argument_group("--process dimo (defaults: the DiMO training defaults, methods/dimo.py)")
    dimo.add_argument("--r-init", type=_probability, default=0.6, help="mask fraction of the generator's input")
    dimo.add_argument("--embed-noise", type=_closed_unit, default=0.1, help="σ of the input-embedding noise")
    dimo.add_argument("--embed-noise-rms", action=argparse.BooleanOptionalAction, default=True,
                      help="scale the noise to the RMS of the embedding table (as in training)")
    dimo.add_argument("--temperature", type=_positive, default=1.0, help="sampling temperature")
    dimo.add_argument("--remask", choices=("confidence", "random"), default="confidence",  # sample_dimo's
                      help="positions re-masked at steps >= 2: the least confident, or uniformly random ones")
    dimo.add_argument("--remask-power", type=_positive, default=1.0,
                      help="step k of N re-masks r_init·L·((N-k+1)/N)^p positions: 1 linear, > 1 fewer at later steps")


def _check_draw(args) -> None:
    if args.draw == "fused" and args.nucleus_p < 1.0:
        raise BadInput(f"--draw fused needs --nucleus-p 1 (got {args.nucleus_p}); nucleus sampling runs on the torch path")


_DIMO_FLAGS = {"r_init": "--r-init", "embed_noise": "--embed-noise", "embed_noise_rms": "--embed-noise-rms",
               "temperature": "--temperature", "remask": "--remask", "remask_power": "--remask-power"}
_MDLM_DUO_FLAGS = {"greedy_tail": "--greedy-tail", "draw": "--draw"}


def _check_process_flags(parser: argparse.ArgumentParser, args, process: str) -> None:
    """Flags of the other sampler family are refused, not ignored: DiMO's with an MDLM/DUO checkpoint, and the
    MDLM/DUO draw flags with a DiMO generator (a flag set to its default is indistinguishable from an unset one)."""
    other = _DIMO_FLAGS if process != "dimo" else _MDLM_DUO_FLAGS
    given = [flag for key, flag in other.items() if getattr(args, key) != parser.get_default(key)]
    if given:
        applies = "--process dimo" if process != "dimo" else "the MDLM and DUO samplers"
        verb = "applies" if len(given) == 1 else "apply"
        raise BadInput(f"{', '.join(given)} {verb} to {applies} only; {args.checkpoint} samples as {process}")


def _sampler_kwargs(args, process: str, model=None) -> dict:
    kwargs = {"nucleus_p": args.nucleus_p}
    if process == "dimo":
        return {**kwargs, "r_init": args.r_init, "embed_noise": args.embed_noise, "temperature": args.temperature,
                "remask": args.remask, "remask_power": args.remask_power, "embed_dim": model.config.hidden_size,
                "noise_rms": model.input_embedding_rms() if args.embed_noise_rms else 1.0}
    kwargs["draw"] = args.draw
    if args.greedy_tail is not None:
        kwargs["greedy_tail"] = args.greedy_tail
    return kwargs


def sample_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddistill sample", formatter_class=_Formatter,
                description="Draw samples from a public-layout checkpoint and print them (progress on stderr).")
    _sampling_args(p)
    p.add_argument("--steps", type=_at_least(1), default=64, help="sampling steps")
    p.add_argument("--out", default=None, help="also write the samples as JSONL here (text, token ids, nfe)")
    return p


def cmd_sample(argv: Sequence[str]) -> None:
    parser = sample_parser()
    args = parser.parse_args(argv)
    _check_draw(args)
    _check_checkpoint(args.checkpoint)
    process = _process_of(args.checkpoint, args.process)
    _check_process_flags(parser, args, process)
    import torch

    from ddistill.diffusion import LogLinearSchedule, sample_dimo, sample_duo, sample_mdlm
    from ddistill.eval.decode import decode_samples
    from ddistill.eval.sample_eval import sampling_progress

    model, cfg = _load(args)
    device = next(model.parameters()).device
    length = args.length or cfg.length
    tokenizer = _model_tokenizer(args.checkpoint, cfg.vocab_size)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    records = []
    bar = sampling_progress(-(-args.num_samples // args.batch_size), desc=f"sampling T={args.steps}")
    for start in range(0, args.num_samples, args.batch_size):
        batch = min(args.batch_size, args.num_samples - start)
        common = dict(batch_size=batch, length=length, num_steps=args.steps, vocab_size=cfg.vocab_size,
                      generator=generator, device=device, **_sampler_kwargs(args, process, model))
        if process == "dimo":
            out = sample_dimo(model, mask_id=cfg.vocab_size - 1, **common)
        elif process == "absorbing":
            out = sample_mdlm(model, mask_id=cfg.vocab_size - 1, time_conditioning=cfg.time_conditioning,
                              cached=not cfg.time_conditioning, schedule=LogLinearSchedule(), row_logits=True, **common)
        else:
            out = sample_duo(model, schedule=LogLinearSchedule(), **common)
        mask_id = None if process == "uniform" else cfg.vocab_size - 1
        for ids, text in zip(out.tokens.cpu(), decode_samples(out.tokens.cpu(), tokenizer, mask_id=mask_id)):
            records.append({"text": text, "token_ids": ids.tolist(), "nfe": out.nfe, "steps": args.steps})
        bar.update(1)
    bar.close()
    for i, rec in enumerate(records):
        print(f"--- sample {i} (steps={rec['steps']}, NFE={rec['nfe']}) ---\n{rec['text']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {len(records)} samples to {args.out}", file=sys.stderr)


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddistill eval", formatter_class=_Formatter,
                description="Gen-PPL, entropy (and MAUVE) against sampling steps: CSV, Markdown, PNG in --out-dir.")
    _sampling_args(p)
    p.add_argument("--steps", type=_at_least(1), nargs="+", default=[8, 16, 32, 64, 128, 256, 1024],
                   help="the sampling step counts to evaluate")
    p.add_argument("--label", default=None, help="curve label (None: the checkpoint's name)")
    p.add_argument("--judge", default="smollm2",
                   help="Gen-PPL judge: smollm2 (offline), gpt2-large (hub), or a local causal-LM directory / .gguf")
    p.add_argument("--judge-batch-size", type=_at_least(1), default=8, help="samples the judge scores together")
    p.add_argument("--mauve-reference", default=None,
                   help="JSONL/text file of reference documents: adds MAUVE of prompt continuations (None: no MAUVE)")
    p.add_argument("--mauve-prompts", type=_at_least(1), default=256, help="reference documents used as prompts")
    p.add_argument("--out-dir", default="runs/eval", help="where the table, plot and sample texts go")
    return p


def _check_judge(name: str) -> None:
    from ddistill.eval.judge import HUB_JUDGES, SMOLLM2

    path = Path(name).expanduser()
    if name in HUB_JUDGES or name == SMOLLM2 or path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return
    raise BadInput(f"--judge {name!r} is neither a known judge ({sorted([*HUB_JUDGES, SMOLLM2])}) nor an existing "
                   "directory or .gguf file")


def cmd_eval(argv: Sequence[str]) -> None:
    parser = eval_parser()
    args = parser.parse_args(argv)
    _check_draw(args)
    _check_checkpoint(args.checkpoint)  # every argument is checked before the model or the judge is loaded
    _check_judge(args.judge)
    if args.mauve_reference and not Path(args.mauve_reference).is_file():
        raise BadInput(f"--mauve-reference {args.mauve_reference} is not a file")
    process = _process_of(args.checkpoint, args.process)
    _check_process_flags(parser, args, process)
    from ddistill.diffusion import LogLinearSchedule
    from ddistill.eval.judge import load_judge
    from ddistill.eval.sample_eval import evaluate_sampler

    model, cfg = _load(args)
    tokenizer = _model_tokenizer(args.checkpoint, cfg.vocab_size)
    references = _read_references(args.mauve_reference) if args.mauve_reference else None
    rows = evaluate_sampler(
        model, process=process, steps_list=args.steps, num_samples=args.num_samples, batch_size=args.batch_size,
        judge=load_judge(args.judge), tokenizer=tokenizer, seed=args.seed, out_dir=args.out_dir,
        label=args.label or Path(args.checkpoint).name, length=args.length or cfg.length,
        vocab_size=cfg.vocab_size, schedule=LogLinearSchedule(),
        mask_id=None if process == "uniform" else cfg.vocab_size - 1,
        sampler_kwargs=_sampler_kwargs(args, process, model), judge_batch_size=args.judge_batch_size,
        reference_texts=references, mauve_num_prompts=args.mauve_prompts,
    )
    from ddistill.eval.report import markdown_table

    print(markdown_table(rows))
    print(f"table and plot in {args.out_dir}", file=sys.stderr)


def run_method(run_dir: str | Path):
    """The method object of a training run, from its resolved config (``<run>/config.yaml``, else the newest
    checkpoint's): what the run's students are is the method's knowledge (`Method.eval_students`)."""
    from ddistill.config import load_yaml
    from ddistill.engine.run_config import run_config_from_dict
    from ddistill.methods import get_method

    run_dir = Path(run_dir)
    candidates = [run_dir / "config.yaml", *sorted((run_dir / "checkpoints").glob("step_*/config.yaml"))[::-1]]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{run_dir} is not a training run: no config.yaml in it or its checkpoints")
    cfg = run_config_from_dict(load_yaml(found))
    vocab = cfg.model.vocab_size
    return get_method(cfg.method.name)(cfg.method.config, vocab_size=vocab, mask_id=vocab - 1)


def cmd_rounds(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="ddistill rounds",
        description="Gen-PPL / entropy (/ MAUVE) of every student of a distillation run (the students its method "
        "lists: one per round for SDTT and DCD), with an optional teacher, on one table and plot.",
    )
    p.add_argument("--run-dir", type=Path, help="training run (train.out_dir) whose students to evaluate")
    p.add_argument("--student", action="append", default=[], metavar="LABEL=PATH",
                   help="extra model: a training checkpoint dir or a public checkpoint (repeatable)")
    p.add_argument("--teacher", help="the initial teacher (public checkpoint / hub id), label 'teacher'")
    p.add_argument("--sampler", choices=("mdlm", "duo"), default=None,
                   help="sampler of --teacher / --student models (default: that of the run's students)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 1024])
    p.add_argument("--rounds", type=int, nargs="*", help="only these rounds (1-based)")
    p.add_argument("--tails", nargs="+", default=["ancestral"], choices=("ancestral", "greedy"),
                   help="final sampling step(s): ancestral and/or greedy (Greedy-Tail)")
    p.add_argument("--out-dir", type=Path, help="default: <run-dir>/eval_rounds")
    p.add_argument("--judge", default="gpt2-large", help="gpt2-large (the papers'), smollm2 (offline) or a path")
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nucleus-p", type=float, default=1.0)
    p.add_argument("--mauve-docs", type=int, default=0,
                   help="MAUVE with this many validation documents of the run's dataset as prompts (0 = off)")
    args = p.parse_args(argv)
    import os

    import torch

    from ddistill.eval.rounds import RoundStudent, evaluate_rounds, reference_texts, run_students

    found, stem, sampler = [], "rounds", args.sampler
    if args.run_dir:
        method = run_method(args.run_dir)
        listed = method.eval_students()
        if args.rounds:
            wanted = {f"round {r}" for r in args.rounds}
            listed = [s for s in listed if s.label in wanted]
        found = run_students(args.run_dir, listed)
        stem, sampler = f"{method.name}_rounds", sampler or found[0].sampler
    sampler = sampler or "mdlm"
    students = [RoundStudent(label="teacher", path=Path(args.teacher), sampler=sampler)] if args.teacher else []
    students += found
    for spec in args.student:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise BadInput(f"--student {spec!r}: expected LABEL=PATH")
        students.append(RoundStudent(label=label, path=Path(path), sampler=sampler))
    if not students:
        raise BadInput("nothing to evaluate: give --run-dir, --teacher and/or --student")
    out_dir = args.out_dir or (args.run_dir / "eval_rounds" if args.run_dir else None)
    if out_dir is None:
        raise BadInput("--out-dir is required without --run-dir")
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    references = reference_texts(args.run_dir, args.mauve_docs) if args.mauve_docs and args.run_dir else None
    try:
        rows = evaluate_rounds(
            students, args.steps, out_dir=out_dir, judge_name=args.judge, num_samples=args.num_samples,
            batch_size=args.batch_size, length=args.length, seed=args.seed, nucleus_p=args.nucleus_p,
            tails=args.tails, reference_texts=references, mauve_num_prompts=max(args.mauve_docs, 1), stem=stem,
        )  # fmt: skip
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rows:
        for student in students:
            trained = f" (distilled for {student.trained_steps} steps)" if student.trained_steps else ""
            print(f"{student.label}: {student.path}{trained}")
        print(f"report: {out_dir}/{stem}.md, .csv, .png")


def _read_references(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [doc for doc in text.split("\n\n") if doc.strip()]


def prepare_usage() -> str:
    import dataclasses

    from ddistill.data.corpora import DataConfig

    keys = "\n".join(f"  {f.name}={f.default!r}" for f in dataclasses.fields(DataConfig))
    return f"""usage: ddistill prepare [key=value ...]
       ddistill prepare CONFIG.yaml [data.key=value ...]

Fetch (where the corpus needs it), tokenise and pack a corpus into token blocks, and cache them, so that a run
starts at once (and offline). The keys are those of a run config's data section, without the `data.` prefix, each
value read as YAML: ddistill prepare dataset=openwebtext block_size=1024 num_proc=16. Or name the run config
itself (with `base:` merging) and only data.* overrides, the ones you would give `ddistill train`: ddistill
prepare configs/experiments/owt_mdlm_small.yaml data.num_proc=16. A run with the same data.* keys reads this
cache; running prepare again reuses what is cached (cache_dir, default $DDISTILL_CACHE/tokens or
~/.cache/ddistill/tokens). Unknown keys and bad values are errors naming the key.

Keys and defaults:
{keys}"""


def cmd_prepare(argv: Sequence[str]) -> None:
    from ddistill.config import apply_overrides, from_dict
    from ddistill.data.corpora import DataConfig
    from ddistill.data.prepare import prepare

    if argv and argv[0] in ("-h", "--help"):
        print(prepare_usage())
        return
    if argv and "=" not in argv[0]:  # a run config: prepare its data section
        from ddistill.config import ConfigError, load_yaml

        config, overrides = argv[0], list(argv[1:])
        foreign = [o for o in overrides if not o.startswith("data.")]
        if foreign:
            raise BadInput(f"{config}: only data.* overrides change what is prepared, got {foreign[0]!r}")
        data = apply_overrides(load_yaml(config), overrides).get("data", {})
        if not isinstance(data, dict):
            raise ConfigError(f"{config}: data: expected a section, got {data!r}")
    else:
        data = apply_overrides({}, list(argv))
    prepare(from_dict(DataConfig, data, "data"))


def cmd_demo(argv: Sequence[str]) -> None:
    from ddistill.demo import demo_main

    demo_main(argv)


def cmd_submit(argv: Sequence[str]) -> None:
    p = _Parser(
        prog="ddistill submit",
        formatter_class=_Formatter,
        description="Launch `ddistill train CONFIG key=value ...` on several GPUs or nodes: torchrun or deepspeed\n"
        "(printed, then run here), or a SLURM job through submitit (one task per GPU; one per CPU slot with\n"
        "--gpus-per-node 0 --tasks-per-node N). The config and the world size are validated first, so that no\n"
        "job is queued only to fail in its log. SLURM jobs: the job folder holds the resolved config, a frozen\n"
        "copy of the code and one log per rank; preemptions and time limits checkpoint and requeue, and the\n"
        "requeued job resumes from the newest checkpoint in train.out_dir.",
    )
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), required=True, help="how to start")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (0: CPU partition)")
    p.add_argument("--node-rank", type=int, default=0, help="torchrun: this node's rank")
    p.add_argument("--master-addr", default=None, help="torchrun/deepspeed: address of node 0")
    p.add_argument("--master-port", type=int, default=29500, help="torchrun/deepspeed: rendezvous port")
    p.add_argument("--hostfile", default=None, help="deepspeed: '<host> slots=<n>' lines")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                       help="'local' runs the same job through submitit's local executor on this machine")
    slurm.add_argument("--tasks-per-node", type=int, default=None,
                       help="ranks per node; unset: one per GPU; needed with --gpus-per-node 0")
    slurm.add_argument("--folder", default="runs/slurm", help="parent of the job folders")
    slurm.add_argument("--job-dir", default=None,
                       help="this job's folder, must be new; unset: FOLDER/<config name>-<date>-<time>")
    slurm.add_argument("--name", default=None, help="SLURM job name; unset: the config file's name")
    slurm.add_argument("--time", default="3-00:00:00", help="time limit (MM, HH:MM:SS, D-HH:MM:SS)")
    slurm.add_argument("--partition", default=None, help="sbatch --partition")
    slurm.add_argument("--account", default=None, help="sbatch --account")
    slurm.add_argument("--qos", default=None, help="sbatch --qos")
    slurm.add_argument("--constraint", default=None, help="sbatch --constraint")
    slurm.add_argument("--exclusive", action="store_true", help="sbatch --exclusive")
    slurm.add_argument("--mem", default=None, help="sbatch --mem per node, e.g. 200G; unset: the partition's")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per rank")
    slurm.add_argument("--setup", action="append", default=[], metavar="CMD",
                       help="shell line run before srun (repeatable), e.g. 'module load cuda'")
    slurm.add_argument("--signal-delay-s", type=int, default=300,
                       help="USR2 this many seconds before the time limit (> one step + one checkpoint)")
    slurm.add_argument("--max-timeouts", type=int, default=20,
                       help="requeues after hitting the time limit (preemptions requeue without limit)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command (torchrun/deepspeed) or the sbatch script and each task's command "
                        "(slurm); start nothing, write nothing")
    args = p.parse_intermixed_args(argv)  # overrides may come after the flags
    from ddistill.engine.run_config import load_run_config
    from ddistill.launchers import check_world_size

    run_cfg = load_run_config(args.config, args.overrides)  # fail fast on a bad config
    if args.launcher == "slurm":
        _submit_slurm(args, argv, run_cfg)
        return
    import shlex
    import subprocess

    from ddistill.launchers import deepspeed_command, parse_hostfile, torchrun_command

    if args.launcher == "torchrun":
        check_world_size(run_cfg.train, args.nodes * args.gpus_per_node,
                         layout=f"{args.nodes} nodes x {args.gpus_per_node} GPUs")
        cmd = torchrun_command(args.config, args.overrides, nproc_per_node=args.gpus_per_node, nnodes=args.nodes,
                               node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)
    else:
        if not args.hostfile or not args.master_addr:
            raise BadInput("--launcher deepspeed needs --hostfile and --master-addr")
        slots = parse_hostfile(Path(args.hostfile).read_text())
        check_world_size(run_cfg.train, sum(slots.values()), layout=f"hostfile {args.hostfile}: {slots}")
        cmd = deepspeed_command(args.config, args.overrides, hostfile=args.hostfile, master_addr=args.master_addr,
                                master_port=args.master_port)
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
        raise SystemExit(subprocess.call(cmd))


def _submit_slurm(args, argv: Sequence[str], run_cfg) -> None:
    import datetime

    from ddistill.launchers import SlurmConfig, parse_time, prepare_job, sbatch_script, submit_job, task_command

    stem = Path(args.config).stem
    job_dir = args.job_dir or str(Path(args.folder) / f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    slurm = SlurmConfig(folder=job_dir, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                        timeout_min=parse_time(args.time), partition=args.partition, account=args.account,
                        qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
                        job_name=args.name or stem, signal_delay_s=args.signal_delay_s,
                        max_num_timeout=args.max_timeouts, setup=list(args.setup))
    job = prepare_job(run_cfg, slurm, source={"config": str(Path(args.config).absolute()),
                                              "overrides": list(args.overrides), "argv": ["submit", *argv]})
    if args.dry_run:
        if args.cluster == "slurm":
            print(sbatch_script(slurm), end="")
        else:
            print(f"# local executor: {slurm.tasks_per_node} processes on this machine, job folder {job.folder}")
        print(f"# each of the {slurm.world_size} tasks runs (RANK etc. from SLURM's variables):\n"
              f"# {task_command(job.folder)}\n# resolved from {args.config} with overrides: "
              f"{' '.join(args.overrides) or '(none)'}")
        return
    try:
        submitted = submit_job(job, cluster=args.cluster)
    except RuntimeError as err:  # no srun here: one line, nothing written
        raise BadInput(str(err)) from None
    print(f"submitted job {submitted.job_id} ({args.cluster}); job folder {job.folder}; rank logs "
          f"{job.folder}/{submitted.job_id}_<rank>_log.out; training into {job.run_config.train.out_dir}", flush=True)


def cmd_jobs(argv: Sequence[str]) -> None:
    p = _Parser(prog="ddistill jobs", formatter_class=_Formatter,
                                description="List the jobs `ddistill submit` wrote into a folder: state (squeue, "
                                "else the job's result), last logged step and loss.")
    p.add_argument("folder", nargs="?", default="runs/slurm", help="a job folder or the parent of job folders")
    p.add_argument("--json", action="store_true", help="one JSON object per job instead of a table")
    args = p.parse_args(argv)
    from ddistill.launchers import format_jobs, list_jobs

    rows = list_jobs(args.folder)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        print(format_jobs(rows))
    else:
        print(f"no jobs in {args.folder}")


def cmd_train(argv: Sequence[str]) -> None:
    from ddistill.engine.trainer import train_command

    code = train_command(list(argv))
    # Leave without interpreter teardown: gloo can abort a finished rank at exit (reference/deepspeed.md P5).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(ExitCode.FINISHED if argv else ExitCode.BAD_INPUT)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ddistill: unknown command {command!r}; choose one of {list(COMMANDS)}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT)
    from ddistill.config import ConfigError

    try:
        globals()[f"cmd_{command}"](rest)
    except ConfigError as err:
        print(f"ddistill {command}: configuration error: {err}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT) from None
    except (ValueError, FileNotFoundError) as err:
        # Bad arguments, paths or checkpoints: the message names the problem; DDISTILL_DEBUG=1 keeps the traceback.
        if os.environ.get("DDISTILL_DEBUG"):
            raise
        kind = "" if isinstance(err, BadInput) else f"{type(err).__name__}: "
        print(f"ddistill {command}: {kind}{err}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT) from None


if __name__ == "__main__":
    main()
