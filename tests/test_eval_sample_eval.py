"""evaluate_sampler end to end on a tiny word-level model tokenizer, a fixed-logit denoiser and the tiny GPT-2 judge
(whose tokenizer has a different id order, so the decode -> retokenise path is exercised)."""

from __future__ import annotations

import json

import pytest
import torch

from ddistill.diffusion.schedules import LogLinearSchedule
from ddistill.eval.judge import load_judge
from ddistill.eval.metrics import gen_ppl, unigram_entropy
from ddistill.eval.report import read_csv
from ddistill.eval.sample_eval import evaluate_sampler, mauve_prompts
from test_eval_judge import EOS, WORDS, _tiny_judge_dir

LENGTH = 12


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return load_judge(str(_tiny_judge_dir(tmp_path_factory.mktemp("judge"))), device="cpu")


@pytest.fixture(scope="module")
def model_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([EOS, *reversed(WORDS), "[UNK]", "[MASK]"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, unk_token="[UNK]", mask_token="[MASK]")


def _denoiser(vocab_size, unk_id, calls=None):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(64, vocab_size, generator=g) * 2.0
    table[:, unk_id] = -1e4  # the model never proposes [UNK], so decode -> encode round-trips

    def denoiser(x, sigma):
        if calls is not None:
            calls.append(x.shape[0])
        return table[: x.shape[1]].expand(x.shape[0], -1, -1).clone()

    return denoiser


def _read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("process", ["absorbing", "uniform"])
def test_evaluate_sampler_rows_match_independent_scoring(tmp_path, judge, model_tokenizer, process):
    V = len(model_tokenizer)
    mask_id = model_tokenizer.mask_token_id
    calls = []
    rows = evaluate_sampler(
        _denoiser(V, model_tokenizer.unk_token_id, calls),
        process=process,
        steps_list=[2, 4],
        num_samples=6,
        batch_size=4,
        judge=judge,
        tokenizer=model_tokenizer,
        seed=0,
        out_dir=tmp_path,
        label="teacher",
        length=LENGTH,
        vocab_size=V,
        schedule=LogLinearSchedule(),
        mask_id=mask_id,
        sampler_kwargs={"cached": False} if process == "absorbing" else {},
    )
    assert [r.steps for r in rows] == [2, 4]
    assert all(r.num_samples == 6 and r.judge == judge.name and r.device == "cpu" for r in rows)
    if process == "uniform":
        assert [r.nfe for r in rows] == [3.0, 5.0]
    assert sum(calls) == 6 * sum(r.nfe for r in rows)  # batches of 4 and 2 (last partial batch sampled)
    for row in rows:
        texts = _read_texts(tmp_path / "samples" / f"teacher_T{row.steps}.jsonl")
        assert len(texts) == 6
        ids = torch.tensor([model_tokenizer(t)["input_ids"] for t in texts])
        if process == "absorbing":
            assert ids.shape == (6, LENGTH)  # every position unmasked
            assert row.entropy == pytest.approx(unigram_entropy(ids), rel=1e-12)
        assert row.gen_ppl == pytest.approx(gen_ppl(texts, judge, batch_size=1, max_length=LENGTH), rel=1e-6)
    assert [(r.label, r.steps) for r in read_csv(tmp_path / "sample_eval.csv")] == [("teacher", 2), ("teacher", 4)]
    assert (tmp_path / "sample_eval.png").stat().st_size > 0
    assert "| teacher | 4 |" in (tmp_path / "sample_eval.md").read_text()
    for row in rows:  # a bootstrap interval around each point estimate
        assert row.gen_ppl_lo <= row.gen_ppl <= row.gen_ppl_hi  # zero width when every sample is the same
        assert row.entropy_lo <= row.entropy <= row.entropy_hi
    readable = (tmp_path / "samples.md").read_text()
    for row in rows:
        first = " ".join(_read_texts(tmp_path / "samples" / f"teacher_T{row.steps}.jsonl")[0].split())
        assert f"## {row.steps} steps" in readable and first[:200] in readable


def test_sharded_sampling_equals_single_process(tmp_path, judge, model_tokenizer):
    V = len(model_tokenizer)
    common = dict(
        process="absorbing",
        steps_list=[3],
        num_samples=8,
        batch_size=2,
        tokenizer=model_tokenizer,
        seed=7,
        label="student",
        length=LENGTH,
        vocab_size=V,
        schedule=LogLinearSchedule(),
        mask_id=model_tokenizer.mask_token_id,
    )
    denoiser = _denoiser(V, model_tokenizer.unk_token_id)
    single = evaluate_sampler(denoiser, judge=judge, out_dir=tmp_path / "single", **common)

    shards = []
    rank1 = evaluate_sampler(
        denoiser, judge=None, out_dir=tmp_path / "r1", rank=1, world_size=2,
        all_gather_fn=lambda t: shards.append(t) or t, **common,
    )  # fmt: skip
    assert rank1 == [] and not (tmp_path / "r1").exists()
    pending = iter(shards)
    rank0 = evaluate_sampler(
        denoiser, judge=judge, out_dir=tmp_path / "r0", rank=0, world_size=2,
        all_gather_fn=lambda t: torch.cat([t, next(pending)]), **common,
    )  # fmt: skip
    assert _read_texts(tmp_path / "r0" / "samples" / "student_T3.jsonl") == _read_texts(
        tmp_path / "single" / "samples" / "student_T3.jsonl"
    )
    assert rank0[0].gen_ppl == single[0].gen_ppl and rank0[0].entropy == single[0].entropy
    assert rank0[0].num_samples == 8 and rank0[0].device == "2x cpu"
    with pytest.raises(ValueError, match="divisible"):
        evaluate_sampler(denoiser, judge=judge, out_dir=tmp_path, rank=0, world_size=3, all_gather_fn=torch.cat, **common)


def test_mauve_prompt_continuations(tmp_path, judge, model_tokenizer):
    pytest.importorskip("mauve")
    V = len(model_tokenizer)
    g = torch.Generator().manual_seed(1)
    docs = [" ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (14,), generator=g)) for _ in range(12)]
    docs.insert(3, "too short")
    prompts, human = mauve_prompts(docs, model_tokenizer, num_prompts=10, prompt_tokens=4, canvas_tokens=10)
    assert prompts.shape == (10, 4) and len(human) == 10
    assert human[0] == " ".join(docs[0].split()[:10])
    rows = evaluate_sampler(
        _denoiser(V, model_tokenizer.unk_token_id),
        process="absorbing",
        steps_list=[2],
        num_samples=2,
        batch_size=4,
        judge=judge,
        tokenizer=model_tokenizer,
        seed=0,
        out_dir=tmp_path,
        label="m",
        length=LENGTH,
        vocab_size=V,
        schedule=LogLinearSchedule(),
        mask_id=model_tokenizer.mask_token_id,
        reference_texts=docs,
        mauve_num_prompts=10,
        mauve_prompt_tokens=4,
        mauve_length=10,
        mauve_kwargs={"num_buckets": 2, "kmeans_num_redo": 1, "kmeans_max_iter": 20},
    )
    assert 0.0 < rows[0].mauve <= 1.0 + 1e-9
    continuations = _read_texts(tmp_path / "samples" / "m_T2_mauve.jsonl")
    assert len(continuations) == 10
    for cont, doc in zip(continuations, [d for d in docs if d != "too short"]):
        assert cont.split()[:4] == doc.split()[:4] and len(cont.split()) == 10  # prompt clamped, canvas filled
    assert read_csv(tmp_path / "sample_eval.csv")[0].mauve == pytest.approx(rows[0].mauve, rel=1e-5)


def test_decode_keeps_eos_drops_mask_with_gpt2_tokenizer():
    from ddistill.data.tokenizer import EOS_ID, MASK_ID, get_tokenizer
    from ddistill.eval.decode import decode_samples

    tok = get_tokenizer()
    hello = tok("Hello world")["input_ids"]
    ids = torch.tensor([[EOS_ID, *hello, MASK_ID, EOS_ID], [MASK_ID, *hello, EOS_ID, MASK_ID]])
    assert decode_samples(ids, tok) == ["<|endoftext|>Hello world<|endoftext|>", "Hello world<|endoftext|>"]


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_evaluate_sampler_with_dit_and_gpt2_tokenizer(tmp_path, judge, time_conditioning):
    from ddistill.data.tokenizer import MASK_ID, VOCAB_SIZE, get_tokenizer
    from ddistill.models.dit import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", time_conditioning=time_conditioning))
    model.train()
    rows = evaluate_sampler(
        model,
        process="absorbing",
        steps_list=[4],
        num_samples=2,
        batch_size=2,
        judge=judge,
        tokenizer=get_tokenizer(),
        seed=0,
        out_dir=tmp_path,
        label="dit",
        length=16,
        vocab_size=VOCAB_SIZE,
        schedule=LogLinearSchedule(),
        mask_id=MASK_ID,
    )
    assert model.training  # mode restored
    assert rows[0].num_samples == 2 and 1.0 <= rows[0].gen_ppl < float("inf")
    texts = _read_texts(tmp_path / "samples" / "dit_T4.jsonl")
    assert len(texts) == 2 and all("[MASK]" not in t and t for t in texts)
    # a time-conditioned DiT is sampled uncached (one call per step); an unconditioned one may reuse x_θ
    assert rows[0].nfe == 4.0 if time_conditioning else rows[0].nfe <= 5.0


def test_progress_bar_counts_step_counts_times_batches(tmp_path, judge, model_tokenizer, capsys):
    V = len(model_tokenizer)
    common = dict(process="absorbing", steps_list=[2, 3], num_samples=5, batch_size=2, judge=judge,
                  tokenizer=model_tokenizer, seed=0, label="bar", length=LENGTH, vocab_size=V,
                  schedule=LogLinearSchedule(), mask_id=model_tokenizer.mask_token_id)
    evaluate_sampler(_denoiser(V, model_tokenizer.unk_token_id), out_dir=tmp_path / "a", **common)
    err = capsys.readouterr().err
    assert "sampling bar" in err and "6/6" in err and "7/6" not in err  # 2 step counts x batches of 2, 2, 1
    evaluate_sampler(_denoiser(V, model_tokenizer.unk_token_id), out_dir=tmp_path / "b", progress=False, **common)
    assert "sampling bar" not in capsys.readouterr().err
