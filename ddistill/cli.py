"""`ddistill` command line: train | sample | eval | prepare | demo | submit.

    ddistill train CONFIG.yaml key=value ...        # any registered method, 1 process or under any launcher
    ddistill sample CHECKPOINT --steps 64           # samples from a public-layout checkpoint (dir, .ckpt, hub id)
    ddistill eval CHECKPOINT --steps 8 16 32        # Gen-PPL / entropy (/ MAUVE) table and plot against steps
    ddistill prepare dataset=classics block_size=128  # fetch, tokenise and cache a corpus
    ddistill demo key=value ...                     # the README's main job (see ddistill.demo)
    ddistill submit CONFIG.yaml key=value ... --launcher slurm|deepspeed|torchrun
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ddistill.exit_codes import ExitCode

COMMANDS = ("train", "sample", "eval", "prepare", "demo", "submit")


def _process_of(checkpoint: str, requested: str) -> str:
    """absorbing (MDLM/SDTT) or uniform (DUO): as requested, else from the HF config's model_type."""
    if requested != "auto":
        return requested
    config = Path(checkpoint) / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in ("mdlm", "duo"):
            return "absorbing" if model_type == "mdlm" else "uniform"
    raise SystemExit(
        f"ddistill: cannot tell whether {checkpoint} is a masked (MDLM/SDTT) or uniform-state (DUO) model; "
        "pass --process absorbing or --process uniform"
    )


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"ddistill: --device {name} requested but CUDA is not available")
    return torch.device(name)


def _load(args):
    from ddistill.models.checkpoints import load_pretrained

    overrides = {"dropout": 0.0}
    if args.time_conditioning is not None:
        overrides["time_conditioning"] = args.time_conditioning == "on"
    model, cfg = load_pretrained(args.checkpoint, use_ema=args.ema, overrides=overrides)
    return model.to(_device(args.device)), cfg


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="public-layout checkpoint: HF directory, Lightning .ckpt, or hub id")
    p.add_argument("--process", choices=("auto", "absorbing", "uniform"), default="auto")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a Lightning .ckpt")
    p.add_argument("--time-conditioning", choices=("on", "off"), default=None,
                   help="override when the checkpoint's config does not record it")
    p.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nucleus-p", type=float, default=1.0)
    p.add_argument("--greedy-tail", action=argparse.BooleanOptionalAction, default=None,
                   help="final step argmax (default: on for DUO, off for MDLM)")
    p.add_argument("--device", default="auto")


def _sampler_kwargs(args, process: str) -> dict:
    kwargs = {"nucleus_p": args.nucleus_p}
    if args.greedy_tail is not None:
        kwargs["greedy_tail"] = args.greedy_tail
    return kwargs


def cmd_sample(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="ddistill sample", description="Draw samples from a checkpoint and print them.")
    _sampling_args(p)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", default=None, help="write the samples as JSONL here (text, token ids, nfe)")
    args = p.parse_args(argv)
    import torch

    from ddistill.data.tokenizer import get_tokenizer
    from ddistill.diffusion import LogLinearSchedule, sample_duo, sample_mdlm
    from ddistill.eval.decode import decode_samples

    process = _process_of(args.checkpoint, args.process)
    model, cfg = _load(args)
    device = next(model.parameters()).device
    length = args.length or cfg.length
    tokenizer = get_tokenizer()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    records = []
    for start in range(0, args.num_samples, args.batch_size):
        batch = min(args.batch_size, args.num_samples - start)
        common = dict(batch_size=batch, length=length, num_steps=args.steps, vocab_size=cfg.vocab_size,
                      schedule=LogLinearSchedule(), generator=generator, device=device,
                      **_sampler_kwargs(args, process))
        if process == "absorbing":
            out = sample_mdlm(model, mask_id=cfg.vocab_size - 1, time_conditioning=cfg.time_conditioning,
                              cached=not cfg.time_conditioning, **common)
        else:
            out = sample_duo(model, **common)
        mask_id = cfg.vocab_size - 1 if process == "absorbing" else None
        for ids, text in zip(out.tokens.cpu(), decode_samples(out.tokens.cpu(), tokenizer, mask_id=mask_id)):
            records.append({"text": text, "token_ids": ids.tolist(), "nfe": out.nfe, "steps": args.steps})
    for i, rec in enumerate(records):
        print(f"--- sample {i} (steps={rec['steps']}, NFE={rec['nfe']}) ---\n{rec['text']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"wrote {len(records)} samples to {args.out}", file=sys.stderr)


def cmd_eval(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="ddistill eval",
                                description="Gen-PPL, entropy (and MAUVE) against sampling steps: CSV, Markdown, PNG.")
    _sampling_args(p)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 1024])
    p.add_argument("--label", default=None, help="curve label (default: the checkpoint's name)")
    p.add_argument("--judge", default="smollm2", help="gpt2-large | smollm2 | a local causal-LM directory")
    p.add_argument("--judge-batch-size", type=int, default=8)
    p.add_argument("--mauve-reference", default=None,
                   help="JSONL/text file of reference documents: adds MAUVE of prompt continuations")
    p.add_argument("--mauve-prompts", type=int, default=256)
    p.add_argument("--out-dir", default="runs/eval")
    args = p.parse_args(argv)
    from ddistill.data.tokenizer import get_tokenizer
    from ddistill.diffusion import LogLinearSchedule
    from ddistill.eval.judge import load_judge
    from ddistill.eval.sample_eval import evaluate_sampler

    process = _process_of(args.checkpoint, args.process)
    model, cfg = _load(args)
    references = _read_references(args.mauve_reference) if args.mauve_reference else None
    rows = evaluate_sampler(
        model, process=process, steps_list=args.steps, num_samples=args.num_samples, batch_size=args.batch_size,
        judge=load_judge(args.judge), tokenizer=get_tokenizer(), seed=args.seed, out_dir=args.out_dir,
        label=args.label or Path(args.checkpoint).name, length=args.length or cfg.length,
        vocab_size=cfg.vocab_size, schedule=LogLinearSchedule(),
        mask_id=cfg.vocab_size - 1 if process == "absorbing" else None,
        sampler_kwargs=_sampler_kwargs(args, process), judge_batch_size=args.judge_batch_size,
        reference_texts=references, mauve_num_prompts=args.mauve_prompts,
    )
    from ddistill.eval.report import markdown_table

    print(markdown_table(rows))
    print(f"table and plot in {args.out_dir}", file=sys.stderr)


def _read_references(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [doc for doc in text.split("\n\n") if doc.strip()]


def cmd_prepare(argv: Sequence[str]) -> None:
    from ddistill.config import apply_overrides, from_dict
    from ddistill.data.corpora import DataConfig
    from ddistill.data.prepare import prepare

    if argv and argv[0] in ("-h", "--help"):
        print("usage: ddistill prepare [dataset=classics] [block_size=1024] [other DataConfig key=value ...]")
        return
    cfg = from_dict(DataConfig, apply_overrides({}, list(argv)), "data")
    prepare(cfg)


def cmd_demo(argv: Sequence[str]) -> None:
    from ddistill.demo import demo_main

    demo_main(argv)


def cmd_submit(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="ddistill submit",
        description="Launch `ddistill train CONFIG key=value ...` on several GPUs or nodes. The config is validated "
        "first, so a typo fails here, not on the cluster.",
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--node-rank", type=int, default=0, help="torchrun: this node's rank")
    p.add_argument("--master-addr", default=None, help="torchrun/deepspeed: address of node 0")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--hostfile", default=None, help="deepspeed: '<host> slots=<n>' lines")
    p.add_argument("--folder", default="runs/slurm", help="slurm: submitit logs and pickles")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--timeout-min", type=int, default=4320)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="slurm: 'local' runs the same job through submitit on this machine")
    p.add_argument("--dry-run", action="store_true", help="print the command / SLURM parameters, start nothing")
    args = p.parse_args(argv)
    import shlex
    import subprocess

    from ddistill.engine.run_config import load_run_config
    from ddistill.launchers import SlurmConfig, deepspeed_command, slurm_parameters, submit, torchrun_command

    load_run_config(args.config, args.overrides)  # fail fast on a bad config
    if args.launcher == "slurm":
        cfg = SlurmConfig(folder=args.folder, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min, partition=args.partition,
                          account=args.account, qos=args.qos)
        if args.dry_run:
            print(json.dumps(slurm_parameters(cfg), indent=1, default=str))
            return
        job = submit(args.config, args.overrides, cfg, cluster=args.cluster)
        print(f"submitted job {job.job_id}; logs in {args.folder}")
        return
    if args.launcher == "torchrun":
        cmd = torchrun_command(args.config, args.overrides, nproc_per_node=args.gpus_per_node, nnodes=args.nodes,
                               node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port)
    else:
        if not args.hostfile or not args.master_addr:
            raise SystemExit("ddistill submit --launcher deepspeed needs --hostfile and --master-addr")
        cmd = deepspeed_command(args.config, args.overrides, hostfile=args.hostfile, master_addr=args.master_addr,
                                master_port=args.master_port)
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
        raise SystemExit(subprocess.call(cmd))


def cmd_train(argv: Sequence[str]) -> None:
    import os

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
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"ddistill: unknown command {command!r}; choose one of {list(COMMANDS)}")
    import os

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
        print(f"ddistill {command}: {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(ExitCode.BAD_INPUT) from None


if __name__ == "__main__":
    main()
