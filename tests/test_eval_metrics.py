"""Unigram entropy, MAUVE and the validation NELBO against hand / closed-form computations."""

from __future__ import annotations

import math

import pytest
import torch

from ddistill.diffusion.schedules import LogLinearSchedule
from ddistill.eval.metrics import ValNLL, unigram_entropy, val_nll_bound

V = 11  # tiny vocab; for the absorbing process the last id is [MASK]
MASK = V - 1


def test_unigram_entropy_by_hand():
    ids = torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5], [0, 1, 2, 3]])
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    expected = (h0 + 0.0 + math.log(4)) / 3
    assert unigram_entropy(ids) == pytest.approx(expected, rel=1e-12)


def _blocks(num_batches, batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=g) for _ in range(num_batches)]


class _Recorder:
    """Denoiser wrapper that records its inputs (x_t, σ_t) for an independent recomputation of the bound."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, xt, sigma):
        self.calls.append((xt.clone(), sigma.clone()))
        return self.fn(xt, sigma)


def test_val_nll_absorbing_perfect_denoiser_is_zero():
    blocks = _blocks(3, 8, 16, MASK)
    it = iter(blocks)
    current = {}

    def perfect(xt, sigma):
        current["x0"] = x0 = next(it)
        assert torch.equal(torch.where(xt == MASK, x0, xt), x0)  # only masking happened
        return torch.nn.functional.one_hot(x0, V).float() * 1e4

    res = val_nll_bound(perfect, blocks, process="absorbing", schedule=LogLinearSchedule(), mask_id=MASK)
    assert res.num_tokens == 3 * 8 * 16
    assert abs(res.nll) < 1e-6 and res.ppl == pytest.approx(1.0, abs=1e-6)


def test_val_nll_absorbing_uniform_denoiser_closed_form():
    """p(x0|x_t) = 1/(V-1) (SUBS zeroes [MASK]): loss = Σ_seq n_masked · (1-ε)/(1-α_t) · log(V-1)."""
    eps = 1e-3
    blocks = _blocks(4, 16, 32, MASK, seed=1)
    rec = _Recorder(lambda xt, sigma: torch.zeros(*xt.shape, V))
    res = val_nll_bound(rec, blocks, process="absorbing", schedule=LogLinearSchedule(eps=eps), mask_id=MASK, seed=3)
    expected = 0.0
    times = []
    for xt, sigma in rec.calls:
        alpha = torch.exp(-sigma.double())
        times.append((1 - alpha) / (1 - eps))
        n_masked = (xt == MASK).sum(dim=1).double()
        expected += float((n_masked * (1 - eps) / (1 - alpha)).sum() * math.log(V - 1))
    assert res.total_nll == pytest.approx(expected, rel=1e-5)
    assert res.num_tokens == 4 * 16 * 32
    # one time per sequence, stratified over each batch: one t in each of the 16 strata of [t_min, 1]
    for t in times:
        strata = torch.floor((t - 1e-3) / (1 - 1e-3) * 16).long().sort().values
        assert torch.equal(strata, torch.arange(16))
    # and its expectation is (1-ε)·log(V-1) per token (loose: Monte-Carlo)
    assert res.nll == pytest.approx((1 - eps) * math.log(V - 1), rel=0.15)


def _udlm_uniform_predictor_loss(x0, xt, alpha, K, eps):
    """UDLM-form NELBO for p = uniform (x̄_θ = 1), evaluated by explicit loops in float64."""
    total = 0.0
    for b in range(x0.shape[0]):
        a = float(alpha[b])
        coeff = -(1 - eps) / (K * a)
        for l in range(x0.shape[1]):
            m, i = int(x0[b, l]), int(xt[b, l])
            xbar = [(1 - a) + K * a * (j == m) for j in range(K)]
            xi = xbar[i]
            term1 = K * (1 / xi - 1.0)
            summand = sum((xbar[j] / xi) * math.log(xbar[j] / xi) for j in range(K))
            total += coeff * (term1 - summand)
    return total


def test_val_nll_uniform_uniform_denoiser_closed_form():
    eps = 1e-3
    blocks = _blocks(2, 8, 12, V, seed=2)
    rec = _Recorder(lambda xt, sigma: torch.zeros(*xt.shape, V))
    res = val_nll_bound(rec, blocks, process="uniform", schedule=LogLinearSchedule(eps=eps), vocab_size=V, seed=5)
    expected = 0.0
    for x0, (xt, sigma) in zip(blocks, rec.calls):
        expected += _udlm_uniform_predictor_loss(x0, xt, torch.exp(-sigma.double()), V, eps)
    assert res.total_nll == pytest.approx(expected, rel=1e-4)
    assert res.nll > 0


def test_val_nll_uniform_perfect_denoiser_is_zero():
    blocks = _blocks(2, 8, 12, V, seed=4)
    it = iter(blocks)
    perfect = lambda xt, sigma: torch.nn.functional.one_hot(next(it), V).float() * 50.0  # noqa: E731
    res = val_nll_bound(perfect, blocks, process="uniform", schedule=LogLinearSchedule(), vocab_size=V)
    assert abs(res.nll) < 1e-4


def test_val_nll_bad_arguments():
    blocks = _blocks(1, 2, 4, MASK)
    with pytest.raises(ValueError, match="process"):
        val_nll_bound(lambda x, s: x, blocks, process="gaussian", schedule=LogLinearSchedule())
    with pytest.raises(ValueError, match="mask_id"):
        val_nll_bound(lambda x, s: x, blocks, process="absorbing", schedule=LogLinearSchedule())
    with pytest.raises(ValueError, match="vocab_size"):
        val_nll_bound(lambda x, s: x, blocks, process="uniform", schedule=LogLinearSchedule())
    assert ValNLL(total_nll=2.0, num_tokens=4).ppl == pytest.approx(math.exp(0.5))


def test_mauve_identical_vs_different(tmp_path):
    pytest.importorskip("mauve")
    from test_eval_judge import _tiny_judge_dir

    from ddistill.eval.judge import load_judge
    from ddistill.eval.metrics import mauve_score

    judge = load_judge(str(_tiny_judge_dir(tmp_path)), device="cpu")
    g = torch.Generator().manual_seed(0)
    words_a = "the a cat dog sat on mat".split()
    words_b = "ran far away and then slept under tree it was warm".split()

    def texts(words, n):
        return [" ".join(words[int(k)] for k in torch.randint(0, len(words), (10,), generator=g)) for _ in range(n)]

    p = texts(words_a, 40)
    same = mauve_score(p, list(p), judge, num_buckets=4, kmeans_num_redo=1, kmeans_max_iter=50)
    different = mauve_score(p, texts(words_b, 40), judge, num_buckets=4, kmeans_num_redo=1, kmeans_max_iter=50)
    assert same > 0.95
    assert different < 0.3


def test_val_nll_runs_dit_in_eval_mode_and_restores_it():
    from ddistill.models.dit import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=V, pad_vocab_multiple=8, dropout=0.5)).train()
    blocks = _blocks(2, 4, 16, MASK, seed=6)
    kwargs = dict(process="absorbing", schedule=LogLinearSchedule(), mask_id=MASK, seed=1)
    first, second = val_nll_bound(model, blocks, **kwargs), val_nll_bound(model, blocks, **kwargs)
    assert model.training
    assert first == second  # no dropout noise: same times, masks and (eval-mode) logits
    assert 0.0 < first.nll < 10.0 * math.log(V)


def test_distinct_n_and_duplicate_fraction_by_brute_force():
    from ddistill.eval.metrics import distinct_n, duplicate_fraction

    ids = torch.tensor([[1, 2, 1, 2, 3], [1, 2, 1, 2, 3], [4, 4, 4, 4, 4]])
    for n in (1, 2, 3, 4):
        grams = [tuple(row[i:i + n].tolist()) for row in ids for i in range(ids.shape[1] - n + 1)]
        assert distinct_n(ids, n) == len(set(grams)) / len(grams)
    assert duplicate_fraction(ids) == 1 - 2 / 3
    assert duplicate_fraction(ids[:1]) == 0.0
    with pytest.raises(ValueError, match="distinct_n"):
        distinct_n(ids, 6)
