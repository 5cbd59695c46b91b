"""`ddistill` command line: sampling from a public-layout checkpoint on CPU, and clear errors on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddistill.models import ModelConfig, build_model, save_pretrained

ROOT = Path(__file__).resolve().parents[1]

MASK_ID = 50257


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ddistill.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def mdlm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", time_conditioning=False, length=24))
    with torch.no_grad():  # a zero-initialised output layer would give uniform logits
        for p in model.parameters():
            if p.dim() >= 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "mdlm", flavor="mdlm")


def test_sample_from_public_layout_checkpoint(mdlm_checkpoint, tmp_path):
    out = tmp_path / "samples.jsonl"
    proc = run_cli("sample", str(mdlm_checkpoint), "--steps", "6", "--num-samples", "3", "--batch-size", "2",
                   "--seed", "7", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert len(rec["token_ids"]) == 24  # the checkpoint's length
        assert all(0 <= t < MASK_ID for t in rec["token_ids"])  # fully unmasked, never the mask id
        assert 1 <= rec["nfe"] <= 7 and rec["steps"] == 6
    assert "NFE=" in proc.stdout
    # Same seed, same samples: the sampler is deterministic given its generator, and the fused draw kernels
    # (Triton interpreter here) draw what the torch path draws.
    again = tmp_path / "again.jsonl"
    proc = run_cli("sample", str(mdlm_checkpoint), "--steps", "6", "--num-samples", "3", "--batch-size", "2",
                   "--seed", "7", "--device", "cpu", "--draw", "fused", "--out", str(again))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["token_ids"] for line in again.read_text().splitlines()] == [
        r["token_ids"] for r in records
    ]


def test_bad_inputs_get_clear_errors(mdlm_checkpoint, tmp_path):
    proc = run_cli("sample", str(tmp_path / "nope"))
    assert proc.returncode != 0
    assert "cannot tell whether" in proc.stderr or "does not exist" in proc.stderr
    proc = run_cli("sample", str(tmp_path / "nope"), "--process", "absorbing")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = run_cli("sample", str(mdlm_checkpoint), "--steps", "0", "--device", "cpu")
    assert proc.returncode == 2 and "argument --steps: must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("frobnicate")
    assert proc.returncode != 0 and "unknown command 'frobnicate'" in proc.stderr
    proc = run_cli("prepare", "dataset=imagenet")
    assert proc.returncode != 0 and "imagenet" in proc.stderr


def test_prepare_a_run_configs_data_section(tmp_path, capsys):
    """`ddistill prepare CONFIG data.key=value` caches the blocks of the config's data section with those overrides:
    the same file as `ddistill prepare key=value` with the section's keys, which a run of that config then reads."""
    from ddistill.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60)))
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {ROOT / 'configs/experiments/classics_mdlm_test.yaml'}\n"
                      f"data: {{dataset: text, path: {corpus}, sample_by: paragraph, cache_dir: {tmp_path / 'a'}}}\n")
    main(["prepare", str(config), "data.block_size=16", "data.max_documents=null"])
    from_config = capsys.readouterr().out
    main(["prepare", "dataset=text", f"path={corpus}", "sample_by=paragraph", f"cache_dir={tmp_path / 'b'}",
          "block_size=16", "max_documents=null"])
    from_keys = capsys.readouterr().out
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in "ab"]
    assert names[0] == names[1] and len(names[0]) >= 2, names  # same cache keys: the same data config
    assert "x 16 tokens" in from_config and from_config.replace("/a/", "/b/") == from_keys
    for argv, message in (([str(config), "train.max_steps=5"], "only data.* overrides change what is prepared"),
                          ([str(tmp_path / "none.yaml")], "config file not found")):
        with pytest.raises(SystemExit) as stop:
            main(["prepare", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def _main_fails(capsys, *argv):
    """`ddistill ARGV` in this process: exits 2 with one line on stderr (no traceback); returns that line."""
    from ddistill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flag,value,message", [
    ("--num-samples", "0", "argument --num-samples: must be >= 1, got 0"),
    ("--num-samples", "-3", "argument --num-samples: must be >= 1, got -3"),
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--length", "0", "argument --length: must be >= 1, got 0"),
    ("--steps", "0", "argument --steps: must be >= 1, got 0"),
    ("--nucleus-p", "0", "argument --nucleus-p: must lie in (0, 1], got 0.0"),
    ("--temperature", "0", "argument --temperature: must be a finite number > 0, got 0.0"),
    ("--temperature", "-0.5", "argument --temperature: must be a finite number > 0, got -0.5"),
    ("--embed-noise", "1.5", "argument --embed-noise: must lie in [0, 1], got 1.5"),
    ("--remask-power", "0", "argument --remask-power: must be a finite number > 0, got 0.0"),
])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_bad_numbers_are_one_line(mdlm_checkpoint, capsys, command, flag, value, message):
    assert message in _main_fails(capsys, command, str(mdlm_checkpoint), flag, value)


def test_missing_paths_and_training_directories_are_named(mdlm_checkpoint, tmp_path, capsys):
    err = _main_fails(capsys, "sample", str(tmp_path / "nope"))
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in err and "--process" not in err
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "MANIFEST.json").write_text("{}")
    (step / "trainer.pt").write_bytes(b"")
    err = _main_fails(capsys, "sample", str(step))
    assert "is a training checkpoint" in err and "holds none yet" in err
    (run / "export" / "student").mkdir(parents=True)
    (run / "export" / "student" / "config.json").write_text("{}")
    for path in (step, run):
        err = _main_fails(capsys, "eval", str(path))
        assert f"sample its export instead: {run / 'export' / 'student'}" in err


def test_eval_checks_its_arguments_before_loading_anything(mdlm_checkpoint, tmp_path, capsys, monkeypatch):
    import ddistill.models.checkpoints

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ddistill.models.checkpoints, "load_pretrained", no_load)
    err = _main_fails(capsys, "eval", str(mdlm_checkpoint), "--judge", str(tmp_path / "no_judge"))
    assert "is neither a known judge" in err
    err = _main_fails(capsys, "eval", str(mdlm_checkpoint), "--mauve-reference", str(tmp_path / "refs.jsonl"))
    assert "--mauve-reference" in err and "is not a file" in err
    err = _main_fails(capsys, "eval", str(mdlm_checkpoint), "--draw", "fused", "--nucleus-p", "0.9")
    assert "--draw fused needs --nucleus-p 1" in err


def test_flags_of_the_other_sampler_are_refused_not_ignored(mdlm_checkpoint, capsys, monkeypatch):
    """DiMO's flags with an MDLM checkpoint, the MDLM/DUO draw flags with --process dimo: one line, exit 2, before
    the model loads."""
    import ddistill.models.checkpoints

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ddistill.models.checkpoints, "load_pretrained", no_load)
    for command in ("sample", "eval"):
        err = _main_fails(capsys, command, str(mdlm_checkpoint), "--temperature", "0.7")
        assert err.endswith(f"--temperature applies to --process dimo only; {mdlm_checkpoint} samples as absorbing")
        err = _main_fails(capsys, command, str(mdlm_checkpoint), "--r-init", "0.5", "--no-embed-noise-rms")
        assert "--r-init, --embed-noise-rms apply to --process dimo only" in err
        err = _main_fails(capsys, command, str(mdlm_checkpoint), "--remask-power", "2")
        assert "--remask-power applies to --process dimo only" in err
        err = _main_fails(capsys, command, str(mdlm_checkpoint), "--process", "dimo", "--no-greedy-tail")
        assert "--greedy-tail applies to the MDLM and DUO samplers only" in err and "samples as dimo" in err
        err = _main_fails(capsys, command, str(mdlm_checkpoint), "--process", "dimo", "--draw", "torch")
        assert "--draw applies to the MDLM and DUO samplers only" in err


def test_length_beyond_the_model_warns_and_samples(mdlm_checkpoint, capsys):
    from ddistill.cli import main

    main(["sample", str(mdlm_checkpoint), "--steps", "2", "--num-samples", "3", "--batch-size", "2",
          "--length", "30", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "warning: --length 30 is beyond the 24 tokens this model was trained on" in captured.err
    assert "sampling T=2" in captured.err and "2/2" in captured.err  # the progress bar: 2 batches
    assert captured.out.count("--- sample ") == 3


def test_help_explains_train_and_prepare_and_shows_every_default(capsys):
    from ddistill.cli import eval_parser, main, sample_parser

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    main(["prepare", "--help"])  # returns: nothing to prepare
    out = capsys.readouterr().out
    train_help, prepare_help = out.split("usage: ddistill prepare")
    for needle in ("CONFIG.yaml", "key=value", "train.out_dir", "resumes", "train.allow_config_change=true",
                   "train.restart_from_scratch=true", "75 preempted", "  model: size,", "  data: dataset,",
                   "  method: name (", "  optim: algorithm, lr,", "  networks: <trained network>.optim", "  train: max_steps,", "  deepspeed: ", "  logging: wandb"):
        assert needle in train_help, needle
    assert "key=value" in prepare_help and "block_size=1024" in prepare_help and "cache" in prepare_help
    for parser in (sample_parser(), eval_parser()):
        options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert all(a.help for a in parser._actions), parser.prog
        assert parser.format_help().count("(default:") == len(options), parser.prog


def test_submit_validates_the_config_then_builds_the_launch(tmp_path):
    config = "configs/experiments/classics_mdlm_tiny.yaml"
    proc = run_cli("submit", config, "train.max_steps=7", "--launcher", "torchrun", "--gpus-per-node", "2",
                   "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--standalone --nproc_per_node=2 -m ddistill.engine" in proc.stdout
    assert proc.stdout.strip().endswith(f"{config} train.max_steps=7")
    proc = run_cli("submit", config, "--launcher", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--dry-run",
                   "--folder", str(tmp_path / "slurm"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()  # the sbatch script (tests/test_launchers*.py check it in detail)
    for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2"):
        assert expected in lines, proc.stdout
    assert not (tmp_path / "slurm").exists()
    proc = run_cli("submit", config, "train.max_stpes=7", "--launcher", "torchrun", "--dry-run")
    assert proc.returncode != 0 and "train.max_stpes" in proc.stderr and "max_steps" in proc.stderr
    proc = run_cli("submit", config, "--launcher", "deepspeed", "--dry-run")
    assert proc.returncode != 0 and "--hostfile" in proc.stderr


def test_eval_writes_table_and_plot(mdlm_checkpoint, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from ddistill.data.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer

    torch.manual_seed(0)
    judge = tmp_path / "judge"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=EOS_ID, eos_token_id=EOS_ID)).save_pretrained(judge)
    get_tokenizer().save_pretrained(judge)
    proc = run_cli("eval", str(mdlm_checkpoint), "--steps", "2", "4", "--num-samples", "2", "--batch-size", "2",
                   "--judge", str(judge), "--device", "cpu", "--label", "tiny", "--out-dir", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ev" / "sample_eval.png").stat().st_size > 0
    table = (tmp_path / "ev" / "sample_eval.md").read_text()
    assert table.count("| tiny |") == 2


def test_dimo_sampler_from_sample_and_eval(mdlm_checkpoint, tmp_path):
    """`--process dimo` samples a (DiMO generator) DiT with x_init + embedding noise, for any number of steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ddistill.data.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer

    out = tmp_path / "dimo.jsonl"
    proc = run_cli("sample", str(mdlm_checkpoint), "--process", "dimo", "--steps", "3", "--num-samples", "2",
                   "--temperature", "0.7", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["nfe"] for r in records] == [3, 3]
    assert all(len(r["token_ids"]) == 24 and all(0 <= t < MASK_ID for t in r["token_ids"]) for r in records)
    fewer = tmp_path / "fewer.jsonl"  # steps 2 and 3 redraw round(14.4·(2/3)³) = 4 and 1 positions instead of 10 and 5
    proc = run_cli("sample", str(mdlm_checkpoint), "--process", "dimo", "--steps", "3", "--num-samples", "2",
                   "--temperature", "0.7", "--remask-power", "3", "--device", "cpu", "--out", str(fewer))
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["token_ids"] for line in fewer.read_text().splitlines()] != [r["token_ids"] for r in records]
    torch.manual_seed(0)
    judge = tmp_path / "judge"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=EOS_ID, eos_token_id=EOS_ID)).save_pretrained(judge)
    get_tokenizer().save_pretrained(judge)
    proc = run_cli("eval", str(mdlm_checkpoint), "--process", "dimo", "--steps", "1", "2", "--num-samples", "4",
                   "--batch-size", "2", "--judge", str(judge), "--device", "cpu", "--label", "g",
                   "--out-dir", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    from ddistill.eval.report import read_csv

    rows = read_csv(tmp_path / "ev" / "sample_eval.csv")
    assert [(r.label, r.steps, r.nfe) for r in rows] == [("g", 1, 1.0), ("g", 2, 2.0)]
    assert all(0 < r.distinct_2 <= 1 and 0 <= r.duplicate_frac < 1 for r in rows)


def test_rounds_rejects_a_directory_that_is_not_a_run(tmp_path):
    proc = run_cli("rounds", "--run-dir", str(tmp_path), "--judge", "smollm2")
    assert proc.returncode != 0
    assert "is not a training run: no config.yaml" in proc.stderr and "Traceback" not in proc.stderr
