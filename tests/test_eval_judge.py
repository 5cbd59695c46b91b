"""Judge scoring and Gen PPL against brute-force float64 computations with a tiny random GPT-2 judge."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ddistill.eval.judge import JudgeUnavailableError, load_judge, valid_target_mask
from ddistill.eval.metrics import gen_ppl

WORDS = "the a cat dog sat on mat ran far away and then slept under tree it was warm".split()
EOS = "<|endoftext|>"


def _tiny_judge_dir(root):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {EOS: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, unk_token="[UNK]")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharper than the default init so per-token NLLs differ visibly
        model.transformer.wte.weight.normal_(0, 1.0)
    out = root / "tiny_judge"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    return load_judge(str(_tiny_judge_dir(tmp_path_factory.mktemp("judge"))), device="cpu")


def _texts(n, seed=0):
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        for _ in range(rng.randint(0, 3)):  # EOS at random places, sometimes first, sometimes repeated
            words.insert(rng.randint(0, len(words)), EOS)
        texts.append(" ".join(words))
    return texts


def _brute_force(judge, texts, max_length):
    """Σ NLL and # valid tokens, one unpadded row at a time, float64 model, explicit loops."""
    model64 = type(judge.model)(judge.model.config)
    model64.load_state_dict(judge.model.state_dict())
    model64 = model64.double().eval()
    eos = judge.eos_token_id
    total, count = 0.0, 0
    for text in texts:
        ids = judge.tokenizer(text)["input_ids"][:max_length]
        with torch.no_grad():
            logp = torch.log_softmax(model64(torch.tensor([ids])).logits[0], dim=-1)
        seen_eos = ids[0] == eos
        for j in range(1, len(ids)):
            if ids[j] == eos:
                if seen_eos:
                    continue
                seen_eos = True
            total -= float(logp[j - 1, ids[j]])
            count += 1
    return total, count


def test_valid_target_mask_matches_loop():
    eos = 7
    ids = torch.tensor(
        [
            [3, 4, 7, 5, 7, 7, 2],  # first EOS mid-row, later EOS dropped, text after first EOS kept
            [7, 1, 2, 7, 3, 7, 0],  # EOS at position 0 is the first one: the later EOS are not valid
            [1, 2, 3, 4, 5, 6, 1],  # no EOS
            [1, 7, 2, 0, 0, 0, 0],  # right padding (mask 0), even if the pad id were EOS
            [5, 5, 7, 7, 7, 7, 7],  # padded with eos
        ]
    )
    attn = torch.ones_like(ids)
    attn[3, 3:] = 0
    attn[4, 4:] = 0
    expected = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for b in range(ids.shape[0]):
        seen = False
        for j in range(ids.shape[1]):
            is_first = ids[b, j] == eos and not seen
            seen = seen or bool(ids[b, j] == eos)
            if j > 0 and attn[b, j] and (ids[b, j] != eos or is_first):
                expected[b, j - 1] = True
    got = valid_target_mask(ids, attn, eos)
    assert torch.equal(got, expected)
    assert got[0].tolist() == [True, True, True, False, False, True]
    assert got[1].tolist() == [True, True, False, True, False, True]
    assert got[4].tolist() == [True, True, False, False, False, False]


def test_score_texts_matches_brute_force_and_keeps_last_partial_batch(tiny_judge):
    texts = _texts(5)
    ref_nll, ref_count = _brute_force(tiny_judge, texts, max_length=32)
    by2 = tiny_judge.score_texts(texts, batch_size=2)
    by5 = tiny_judge.score_texts(texts, batch_size=5)
    singles = [tiny_judge.score_texts([t], batch_size=1) for t in texts]
    assert by2[1] == by5[1] == sum(c for _, c in singles) == ref_count
    assert by2[0] == pytest.approx(ref_nll, rel=1e-5)
    assert by5[0] == pytest.approx(ref_nll, rel=1e-5)
    assert sum(n for n, _ in singles) == pytest.approx(ref_nll, rel=1e-5)
    # dropping the last partial batch would lose the 5th text
    assert tiny_judge.score_texts(texts[:4], batch_size=2)[1] < ref_count


def test_per_sample_scores_are_each_texts_own_brute_force_score(tiny_judge):
    texts = _texts(5, seed=2)
    nll, count = tiny_judge.score_texts_per_sample(texts, batch_size=2)
    assert nll.dtype == np.float64 and count.dtype == np.int64 and nll.shape == count.shape == (5,)
    for i, text in enumerate(texts):
        ref_nll, ref_count = _brute_force(tiny_judge, [text], max_length=32)
        assert count[i] == ref_count
        assert nll[i] == pytest.approx(ref_nll, rel=1e-5)


def test_output_layer_at_the_targets_only_equals_the_whole_models_logits(tiny_judge):
    import dataclasses

    assert tiny_judge.head_at_targets  # GPT-2: the fast path is what the other tests exercise
    whole = dataclasses.replace(tiny_judge, head_at_targets=False)
    texts = _texts(9, seed=3) + ["", "the"]  # an empty text and a one-token text have no target
    fast_nll, fast_count = tiny_judge.score_texts_per_sample(texts, batch_size=4)
    ref_nll, ref_count = whole.score_texts_per_sample(texts, batch_size=4)
    assert np.array_equal(fast_count, ref_count) and fast_count[-2:].tolist() == [0, 0]
    np.testing.assert_allclose(fast_nll, ref_nll, rtol=1e-6, atol=1e-9)


def test_gen_ppl_is_exp_of_brute_force(tiny_judge):
    texts = _texts(7, seed=1)
    ref_nll, ref_count = _brute_force(tiny_judge, texts, max_length=32)
    assert gen_ppl(texts, tiny_judge, batch_size=3) == pytest.approx(math.exp(ref_nll / ref_count), rel=1e-5)


def test_truncation_at_max_length(tiny_judge):
    texts = [" ".join(WORDS)] * 2  # 19 tokens
    ref_nll, ref_count = _brute_force(tiny_judge, texts, max_length=8)
    nll, count = tiny_judge.score_texts(texts, batch_size=2, max_length=8)
    assert count == ref_count == 2 * 7
    assert nll == pytest.approx(ref_nll, rel=1e-5)


def test_gen_ppl_from_token_ids_drops_mask(tiny_judge):
    tok = tiny_judge.tokenizer
    texts = ["the cat sat on the mat", "a dog ran far away"]
    mask_id = 1  # stands in for [MASK]; "[UNK]" is never produced by these texts
    ids = [tok(t)["input_ids"] for t in texts]
    rows = torch.tensor([ids[0][:3] + [mask_id] + ids[0][3:], ids[1] + [mask_id, mask_id]])
    assert gen_ppl(rows, tiny_judge, model_tokenizer=tok, mask_id=mask_id) == pytest.approx(gen_ppl(texts, tiny_judge))


def test_load_judge_is_cached(tiny_judge):
    assert load_judge(tiny_judge.name, device="cpu") is tiny_judge


def test_unknown_judge_and_offline_hub_errors():
    with pytest.raises(ValueError, match="neither a known judge"):
        load_judge("/nonexistent/judge", device="cpu")
    with pytest.raises(JudgeUnavailableError, match="HF_HUB_OFFLINE"):
        load_judge("gpt2-large", device="cpu")


def test_eos_token_must_be_in_judge_vocab(tmp_path):
    with pytest.raises(ValueError, match="not a single token"):
        load_judge(str(_tiny_judge_dir(tmp_path)), device="cpu", eos_token="<|im_end|>")
