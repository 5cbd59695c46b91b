"""`ddistill demo` end to end with tiny settings: corpus, MDLM teacher, SDTT rounds, samples, judge, table + plot."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from ddistill.config import ConfigError
from ddistill.demo import resolve_profile, run_demo

COMMON = ["model.size=test", "model.length=32", "data.block_size=32", "train.device=cpu", "logging.wandb=disabled",
          "logging.progress_bar=false", "train.global_batch_size=4", "train.micro_batch_size=2"]


def _judge_dir(root):
    """A 2-layer GPT-2 judge with the GPT-2 tokenizer (a stand-in for SmolLM2, which the eval tests load)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ddistill.data.tokenizer import EOS_ID, VOCAB_SIZE, get_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=128, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS_ID,
                     eos_token_id=EOS_ID)
    GPT2LMHeadModel(cfg).save_pretrained(root / "judge")
    get_tokenizer().save_pretrained(root / "judge")
    return root / "judge"


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    teacher = [*COMMON, "train.max_steps=4", "train.ckpt_every=4", "optim.warmup_steps=1", "train.eval_every=0"]
    sdtt = [*COMMON, "method.initial_teacher_steps=8", "optim.warmup_steps=1"]
    cfg = resolve_profile([
        "profile=cpu", f"out_dir={tmp_path / 'demo'}", f"teacher.overrides={json.dumps(teacher)}",
        f"distill.sdtt.overrides={json.dumps(sdtt)}", "distill.sdtt.num_rounds=2", "distill.sdtt.steps_per_round=2",
        "steps=[2, 4]", "num_samples=4", "num_samples_at={}", "batch_size=2", f"judge={_judge_dir(tmp_path)}",
    ])
    rows = run_demo(cfg)
    printed, err = capsys.readouterr()
    assert "sampling teacher" in err and "4/4" in err  # the progress bar: 2 step counts x 2 batches per model
    labels = ["teacher", "sdtt round 1", "sdtt round 2"]
    assert [(r.label, r.steps) for r in rows] == [(label, s) for label in labels for s in (2, 4)]
    for row in rows:
        assert math.isfinite(row.gen_ppl) and row.gen_ppl > 1.0
        assert 0.0 < row.entropy <= math.log(32) + 1e-9  # at most 32 distinct ids in a 32-token sample
        assert row.num_samples == 4 and 1 <= row.nfe <= row.steps + 1
    out = tmp_path / "demo"
    with (out / "demo.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "demo.png").stat().st_size > 0 and "sdtt round 2" in (out / "demo.md").read_text()
    models = json.loads((out / "models.json").read_text())
    assert list(models) == labels
    # Each round's student is its own export: distillation changed the weights, round 2 differs from round 1.
    from safetensors.torch import load_file

    assert {v["sampler"] for v in models.values()} == {"mdlm"}
    weights = {k: load_file(f"{v['path']}/model.safetensors") for k, v in models.items()}
    key = "backbone.blocks.0.attn_qkv.weight"
    assert not torch.equal(weights["teacher"][key], weights["sdtt round 1"][key])
    assert not torch.equal(weights["sdtt round 1"][key], weights["sdtt round 2"][key])
    # The SDTT run's method state reached round 2 with the 8 / 2^2 = 2-step student.
    metrics = [json.loads(line) for line in (out / "sdtt" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("student_steps") == 2.0 for m in metrics)
    # Each student is the EMA of its own round's checkpoint (step 2 for round 1, step 4 for round 2).
    for label, step in (("sdtt round 1", 2), ("sdtt round 2", 4)):
        ema = torch.load(out / "sdtt" / "checkpoints" / f"step_{step:08d}" / "ema" / "student.pt")["shadow"]
        assert torch.equal(weights[label][key], ema["blocks.0.attn_qkv.weight"])
    # Intervals on every cell; decoded samples beside the tensors; teacher vs last student printed side by side.
    teacher_ppl = {r.steps: r.gen_ppl for r in rows if r.label == "teacher"}
    for row in rows:
        assert row.gen_ppl_lo <= row.gen_ppl <= row.gen_ppl_hi and row.entropy_lo <= row.entropy <= row.entropy_hi
        if row.label == "teacher":
            assert row.ppl_ratio is None and row.ppl_ratio_bootstrap == ""
        else:  # the student's Gen PPL over the teacher's at the same steps, with its own bootstrap interval
            assert row.ppl_ratio == pytest.approx(row.gen_ppl / teacher_ppl[row.steps], rel=1e-9)
            assert row.ppl_ratio_lo <= row.ppl_ratio <= row.ppl_ratio_hi
            assert row.ppl_ratio_bootstrap == "paired"  # same seeds for every model: common random numbers
        texts = (out / "samples" / f"{row.label.replace(' ', '_')}_T{row.steps}.jsonl").read_text().splitlines()
        assert len(texts) == 4 and all(isinstance(json.loads(t)["text"], str) for t in texts)
    assert "## 2 steps" in (out / "samples.md").read_text() and "### sdtt_round_2" in (out / "samples.md").read_text()
    assert "[demo] teacher, 2 steps, sample 1:" in printed and "[demo] sdtt round 2, 2 steps, sample 2:" in printed
    assert "s of CPU time" in printed and "[demo] samples a cell: T=2: 4, T=4: 4\n" in printed

    # A second run into the same out_dir trains nothing and gives the same table with the same labels.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sdtt" / "checkpoints").rglob("MANIFEST.json")}
    again = run_demo(cfg)
    untimed = [dataclasses.replace(r, sample_seconds=None) for r in rows]
    assert [dataclasses.replace(r, sample_seconds=None) for r in again] == untimed
    assert {p: p.stat().st_mtime_ns for p in (out / "sdtt" / "checkpoints").rglob("MANIFEST.json")} == stamps
    printed = capsys.readouterr().out
    assert "[demo] sdtt round 1: finished earlier" in printed and "[demo] teacher: finished earlier" in printed
    again_weights = {k: load_file(f"{v['path']}/model.safetensors") for k, v in models.items()}
    assert all(torch.equal(again_weights[k][key], weights[k][key]) for k in labels)

    # Scoring needs only the samples and models.json (samples drawn on a GPU node, scored elsewhere): the same table
    # with every model's weights moved away.
    for i, v in enumerate(models.values()):
        (tmp_path / v["path"] / "model.safetensors").rename(tmp_path / f"weights_{i}.safetensors")
    scored = run_demo(dataclasses.replace(cfg, stage="score"))
    assert [dataclasses.replace(r, sample_seconds=None) for r in scored] == untimed
    # Sample files that do not record their draws (written before the record): the ratio's interval resamples the
    # two sets independently, and says so; the ratio itself is the same.
    for path in (out / "samples").rglob("steps_*.pt"):
        saved = torch.load(path, weights_only=False)
        saved.pop("draws")
        torch.save(saved, path)
    legacy = run_demo(dataclasses.replace(cfg, stage="score"))
    assert {r.ppl_ratio_bootstrap for r in legacy if r.label != "teacher"} == {"independent"}
    assert [r.ppl_ratio for r in legacy] == [r.ppl_ratio for r in scored]


def test_profiles_show_the_claim_setup():
    """CPU: a classics BPE matching the model's vocabulary, teacher and students of one architecture (SDTT's
    init_from refuses any other, but only after the teacher has trained), every round's student step count among the
    step counts shown (the cells of the claim), 64+ samples a cell; GPU: the offline judge."""
    from ddistill.data.tokenizer import check_vocab_size
    from ddistill.engine.run_config import load_run_config
    from ddistill.models.dit import resolve_model_config

    cpu = resolve_profile(["profile=cpu"])
    assert cpu.num_samples >= 64 and cpu.judge == "smollm2"
    spec = cpu.distill["sdtt"]
    rounds = [f"method.num_rounds={spec.num_rounds}", f"method.steps_per_round={spec.steps_per_round}"]
    runs = [load_run_config(cpu.teacher.config, [*cpu.teacher.overrides, "train.out_dir=unused"]),
            load_run_config(spec.config, [*spec.overrides, *rounds, "init_from=unused", "train.out_dir=unused"])]
    architectures = set()
    for run in runs:
        assert run.data.tokenizer.startswith("classics-bpe-") and run.data.block_size == run.model.length
        check_vocab_size(run.data.tokenizer, run.model.vocab_size, what="model.vocab_size")
        model = resolve_model_config(run.model)
        architectures.add((model.hidden_size, model.n_blocks, model.n_heads, model.cond_dim, model.length,
                           model.vocab_size, run.data.tokenizer))
    assert len(architectures) == 1, architectures
    sdtt = runs[1].method.config
    students = [sdtt.initial_teacher_steps // sdtt.num_teacher_steps ** (r + 1) for r in range(spec.num_rounds)]
    assert set(students) <= set(cpu.steps) and sdtt.initial_teacher_steps in cpu.steps, (students, cpu.steps)
    gpu = resolve_profile(["profile=gpu"])
    assert gpu.judge == "smollm2" and gpu.num_samples >= 64


@pytest.mark.slow
def test_duo_pipeline_end_to_end(tmp_path):
    """method=duo: a DUO teacher trained with the curriculum, DCD rounds, both DUO tails."""
    teacher = [*COMMON, "train.max_steps=4", "train.ckpt_every=4", "optim.warmup_steps=1", "train.eval_every=0",
               "method.curriculum_end=2", "train.log_every=1"]
    dcd = [*COMMON, "optim.warmup_steps=1", "method.base_num_steps=8"]
    cfg = resolve_profile([
        "method=duo", "profile=cpu", f"out_dir={tmp_path / 'demo'}", f"teacher.overrides={json.dumps(teacher)}",
        f"distill.dcd.overrides={json.dumps(dcd)}", "distill.dcd.num_rounds=2", "distill.dcd.steps_per_round=2",
        "steps=[2]", "num_samples=2", "batch_size=2", f"judge={_judge_dir(tmp_path)}",
    ])
    rows = run_demo(cfg)
    curves = [f"{m} {t}" for m in ("teacher", "dcd round 1", "dcd round 2") for t in ("ancestral", "greedy")]
    assert [(r.label, r.steps, r.nfe) for r in rows] == [(c, 2, 3.0) for c in curves]
    models = json.loads((tmp_path / "demo" / "models.json").read_text())
    assert {k: v["sampler"] for k, v in models.items()} == dict.fromkeys(["teacher", "dcd round 1", "dcd round 2"],
                                                                          "duo")
    metrics = [json.loads(line) for line in (tmp_path / "demo" / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [m["curriculum"] for m in metrics if "curriculum" in m] == [1.0, 1.0, 0.0, 0.0]
    dcd_metrics = [json.loads(line) for line in (tmp_path / "demo" / "dcd" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("delta") == 2 / 8 for m in dcd_metrics)


def test_dimo_pipeline_end_to_end(tmp_path):
    """method=dimo: an MDLM teacher, one DiMO run (three networks); the generator's export sampled with sample_dimo
    at the same step counts as the teacher."""
    teacher = [*COMMON, "train.max_steps=4", "train.ckpt_every=4", "optim.warmup_steps=1", "train.eval_every=0"]
    dimo = [*COMMON, "networks.generator.optim.warmup_steps=1", "networks.aux.optim.warmup_steps=1"]
    cfg = resolve_profile([
        "method=dimo", "profile=cpu", f"out_dir={tmp_path / 'demo'}", f"teacher.overrides={json.dumps(teacher)}",
        f"distill.dimo.overrides={json.dumps(dimo)}", "distill.dimo.max_steps=2", "steps=[1,2]", "num_samples=2",
        "batch_size=2", f"judge={_judge_dir(tmp_path)}",
    ])
    rows = run_demo(cfg)
    assert [(r.label, r.steps) for r in rows] == [("teacher", 1), ("teacher", 2), ("dimo", 1), ("dimo", 2)]
    models = json.loads((tmp_path / "demo" / "models.json").read_text())
    assert {k: v["sampler"] for k, v in models.items()} == {"teacher": "mdlm", "dimo": "dimo"}
    from ddistill.models.checkpoints import load_pretrained

    student, _ = load_pretrained(models["dimo"]["path"])
    ema = torch.load(tmp_path / "demo" / "dimo" / "checkpoints" / "step_00000002" / "ema" / "generator.pt")["shadow"]
    assert all(torch.equal(p.detach(), ema[n]) for n, p in student.named_parameters())  # the generator's EMA
    with pytest.raises(ConfigError, match="max_steps=0 must be >= 1"):
        resolve_profile(["method=dimo", "profile=cpu", "distill.dimo.max_steps=0"])


def test_profile_and_keys_are_validated():
    with pytest.raises(ConfigError, match="profile: 'huge' is not allowed"):
        resolve_profile(["profile=huge"])
    with pytest.raises(ConfigError, match="method: 'mdlm' is not allowed"):
        resolve_profile(["method=mdlm"])
    with pytest.raises(ConfigError, match="profile: 'cpu_long' is not allowed for method=duo"):
        resolve_profile(["method=duo", "profile=cpu_long"])
    with pytest.raises(ConfigError, match="tails"):
        resolve_profile(["profile=cpu", "tails=[nucleus]"])
    with pytest.raises(ConfigError, match="unknown config key 'num_sample'"):
        resolve_profile(["profile=cpu", "num_sample=3"])


@pytest.mark.parametrize("args, message", [
    (["bogus=1"], "unknown config key 'bogus'"),
    (["num_samples=0"], "num_samples=0 must be >= 1"),
    (["batch_size=-1"], "batch_size=-1 must be >= 1"),
    (["judge_batch_size=0"], "judge_batch_size=0 must be >= 1"),
    (["steps=[]"], "steps: [] must be distinct step counts >= 1"),
    (["steps=[0, 2]"], "steps: [0, 2] must be distinct step counts >= 1"),
    (["steps=[2, 2]"], "steps: [2, 2] must be distinct step counts >= 1"),
    (["num_samples_at={2: 0}"], "num_samples_at: {2: 0} must be >= 1"),
])
def test_bad_demo_arguments_get_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    """Checked before any training: one line on stderr, BAD_INPUT, and nothing written."""
    from ddistill.cli import main
    from ddistill.exit_codes import ExitCode

    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as stop:
        main(["demo", "profile=cpu", f"out_dir={out}", *args])
    err = capsys.readouterr().err
    assert stop.value.code == ExitCode.BAD_INPUT and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_later_stages_without_the_earlier_ones_name_what_to_run(tmp_path, capsys):
    from ddistill.cli import main
    from ddistill.exit_codes import ExitCode

    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as stop:
        main(["demo", "profile=cpu", f"out_dir={out}", "stage=sample"])
    err = capsys.readouterr().err
    assert stop.value.code == ExitCode.BAD_INPUT and "holds no trained models (models.json)" in err, err
    assert "stage=all or stage=train" in err and not out.exists()
    out.mkdir()
    (out / "models.json").write_text(json.dumps({"teacher": {"path": str(tmp_path / "none"), "sampler": "mdlm"}}))
    with pytest.raises(SystemExit) as stop:
        main(["demo", "profile=cpu", f"out_dir={out}", "stage=score", "steps=[3]"])
    err = capsys.readouterr().err
    assert stop.value.code == ExitCode.BAD_INPUT and "no samples of teacher at 3 steps" in err, err


def test_num_samples_at_sets_the_cells_of_one_step_count():
    cfg = resolve_profile(["profile=cpu", "num_samples=32", "num_samples_at={2: 96}", "steps=[2, 4]"])
    assert (cfg.samples_at(2), cfg.samples_at(4)) == (96, 32)
    assert cfg.sample_counts_line() == "[demo] samples a cell: T=2: 96, T=4: 32"
    assert resolve_profile(["profile=cpu", "num_samples_at.4=100"]).num_samples_at == {2: 768, 4: 100, 8: 128, 16: 128}
    # The CPU profile's entries for 8 and 16 steps, with steps overridden: said, not dropped in silence.
    cfg = resolve_profile(["profile=cpu", "steps=[2, 4]"])
    assert cfg.sample_counts_line() == "[demo] samples a cell: T=2: 768, T=4: 256 (num_samples_at for [8, 16] unused: not in steps)"
