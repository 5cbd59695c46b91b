"""Bootstrap intervals of Gen PPL and entropy (eval.metrics) and how the report carries them (eval.report)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddistill.eval.metrics import (gen_ppl_interval, gen_ppl_ratio_interval, mean_interval, unigram_entropy,
                                   unigram_entropy_per_sample)
from ddistill.eval.report import EvalRow, markdown_table, plot_curves, read_csv, write_csv


def test_mean_interval_covers_the_true_mean_at_its_level():
    """400 data sets of 40 draws of N(1, 1): the 90% interval must cover 1 in 90% ± a binomial 4σ (≈ 6%) of them."""
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(400):
        lo, hi = mean_interval(rng.normal(1.0, 1.0, size=40), level=0.9, num_resamples=400, seed=trial)
        covered += lo <= 1.0 <= hi
    sigma = math.sqrt(400 * 0.9 * 0.1)
    assert abs(covered - 360) < 4 * sigma + 8  # the percentile bootstrap under-covers slightly at n = 40


def test_gen_ppl_interval_matches_the_exhaustive_bootstrap_of_three_samples():
    """With 3 samples there are 27 equally likely resamples: the seeded Monte-Carlo quantiles approach the exact
    quantiles of that finite distribution."""
    nll = np.array([3.0, 12.0, 40.0])
    tokens = np.array([2, 5, 9])
    exact = sorted(
        math.exp((nll[[a, b, c]].sum()) / tokens[[a, b, c]].sum()) for a in range(3) for b in range(3) for c in range(3)
    )
    lo, hi = gen_ppl_interval(nll, tokens, level=0.5, num_resamples=200_000, seed=1)
    want_lo, want_hi = np.quantile(exact, [0.25, 0.75])
    # Quantiles of a discrete distribution: the Monte-Carlo quantile is one of the two atoms around the exact one.
    atoms = sorted(set(exact))

    def bracketed(x, w):
        below = max(a for a in atoms if a <= w + 1e-12)
        above = min(a for a in atoms if a >= w - 1e-12)
        return below - 1e-9 <= x <= above + 1e-9

    assert bracketed(lo, want_lo) and bracketed(hi, want_hi), (lo, hi, want_lo, want_hi)
    point = math.exp(nll.sum() / tokens.sum())
    assert lo <= point <= hi


def test_gen_ppl_ratio_interval_matches_the_exhaustive_bootstrap_of_two_small_sets():
    """Sets of 3 and 2 samples: 27 × 4 equally likely resample pairs. The point is the ratio of the two corpus Gen
    PPLs, and the seeded Monte-Carlo quantiles lie at the exact quantiles' atoms of that finite distribution."""
    nll, tok = np.array([3.0, 12.0, 40.0]), np.array([2, 5, 9])
    ref_nll, ref_tok = np.array([10.0, 30.0]), np.array([4, 6])
    point, lo, hi = gen_ppl_ratio_interval(nll, tok, ref_nll, ref_tok, level=0.5, num_resamples=200_000, seed=2)
    assert point == pytest.approx(math.exp(nll.sum() / tok.sum()) / math.exp(ref_nll.sum() / ref_tok.sum()), rel=1e-12)
    exact = sorted(math.exp(nll[[a, b, c]].sum() / tok[[a, b, c]].sum() - ref_nll[[d, e]].sum() / ref_tok[[d, e]].sum())
                   for a in range(3) for b in range(3) for c in range(3) for d in range(2) for e in range(2))
    atoms = sorted(set(exact))
    for got, want in zip((lo, hi), np.quantile(exact, [0.25, 0.75])):
        below = max(a for a in atoms if a <= want + 1e-12)
        above = min(a for a in atoms if a >= want - 1e-12)
        assert below - 1e-9 <= got <= above + 1e-9, (got, want)


def test_gen_ppl_ratio_interval_separates_what_overlapping_intervals_do_not():
    """Two sets whose mean per-token NLLs differ by 3 standard errors (SE = σ/√n of each set's mean): their own 95%
    intervals overlap (that needs > 3.92 SE), the ratio's excludes 1 (that needs > 2.77 SE). Two sets from the same
    distribution: the ratio's interval covers 1 in about 95% of 200 trials."""
    rng = np.random.default_rng(5)
    n, sigma = 256, 0.5
    z = rng.normal(size=n)
    z = (z - z.mean()) / z.std()  # exactly mean 0, sd 1: the two sets' means differ by exactly 3 SE
    tok = np.full(n, 16)
    better = tok * (4.0 + sigma * rng.permutation(z))
    worse = tok * (4.0 + 3 * sigma / math.sqrt(n) + sigma * rng.permutation(z))
    lo_b, hi_b = gen_ppl_interval(better, tok, seed=0)
    lo_w, hi_w = gen_ppl_interval(worse, tok, seed=1)
    assert lo_w < hi_b  # the per-set intervals overlap
    ratio, lo, hi = gen_ppl_ratio_interval(better, tok, worse, tok, seed=0)
    assert ratio == pytest.approx(math.exp(-3 * sigma / math.sqrt(n)), rel=1e-9)
    assert lo < ratio < hi < 1.0
    covered = 0
    for trial in range(200):
        a, b = tok[:64] * (4.0 + sigma * rng.normal(size=(2, 64)))
        _, lo, hi = gen_ppl_ratio_interval(a, tok[:64], b, tok[:64], num_resamples=300, seed=trial)
        covered += lo <= 1.0 <= hi
    assert abs(covered - 190) <= 4 * math.sqrt(200 * 0.95 * 0.05) + 6
    with pytest.raises(ValueError, match="ref_token_counts sum to zero"):
        gen_ppl_ratio_interval(a, tok[:64], b, np.zeros(64))
    with pytest.raises(ValueError, match="equal non-empty"):
        gen_ppl_ratio_interval(a, tok[:63], b, tok[:64])


def test_paired_ratio_interval_matches_the_exhaustive_joint_bootstrap():
    """Three pairs: 27 equally likely joint resamples of the pair indices (one index set for both sets)."""
    nll, tok = np.array([3.0, 12.0, 40.0]), np.array([2, 5, 9])
    ref_nll, ref_tok = np.array([4.0, 11.0, 47.0]), np.array([2, 4, 9])
    point, lo, hi = gen_ppl_ratio_interval(nll, tok, ref_nll, ref_tok, level=0.5, num_resamples=200_000, seed=4,
                                           paired=True)
    assert point == pytest.approx(math.exp(nll.sum() / tok.sum() - ref_nll.sum() / ref_tok.sum()), rel=1e-12)
    exact = sorted(math.exp(nll[[a, b, c]].sum() / tok[[a, b, c]].sum() - ref_nll[[a, b, c]].sum() / ref_tok[[a, b, c]].sum())
                   for a in range(3) for b in range(3) for c in range(3))
    atoms = sorted(set(exact))
    for got, want in zip((lo, hi), np.quantile(exact, [0.25, 0.75])):
        below = max(a for a in atoms if a <= want + 1e-12)
        above = min(a for a in atoms if a >= want - 1e-12)
        assert below - 1e-9 <= got <= above + 1e-9, (got, want)
    with pytest.raises(ValueError, match="one sample each per pair"):
        gen_ppl_ratio_interval(nll, tok, ref_nll[:2], ref_tok[:2], paired=True)


def test_paired_ratio_interval_cancels_shared_noise_and_keeps_its_coverage():
    """Pairs that share most of their noise (per-sample NLL = common part + a small own part), as samples drawn
    with the same random numbers do: a 2% effect that the independent interval cannot resolve lies outside the
    paired one; with no effect, the paired 95% interval covers 1 in about 95% of 200 trials."""
    rng = np.random.default_rng(7)
    n, tok = 256, np.full(256, 16)
    common, own = rng.normal(size=(2, n))
    student = tok * (4.0 + 0.5 * common + 0.05 * own)
    teacher = tok * (4.02 + 0.5 * common + 0.05 * rng.normal(size=n))
    _, lo, hi = gen_ppl_ratio_interval(student, tok, teacher, tok, seed=0)
    assert lo < 1.0 < hi  # resampled independently, the shared noise swamps the effect
    ratio, lo, hi = gen_ppl_ratio_interval(student, tok, teacher, tok, seed=0, paired=True)
    assert lo < ratio < hi < 1.0
    covered = 0
    for trial in range(200):
        shared = rng.normal(size=64)
        a, b = (tok[:64] * (4.0 + 0.5 * shared + 0.05 * rng.normal(size=64)) for _ in range(2))
        _, lo, hi = gen_ppl_ratio_interval(a, tok[:64], b, tok[:64], num_resamples=300, seed=trial, paired=True)
        covered += lo <= 1.0 <= hi
    assert abs(covered - 190) <= 4 * math.sqrt(200 * 0.95 * 0.05) + 6


def test_intervals_are_seeded_and_shrink_with_more_samples():
    rng = np.random.default_rng(3)
    tokens = rng.integers(20, 60, size=400)
    nll = tokens * rng.gamma(4.0, 1.0, size=400)
    small = gen_ppl_interval(nll[:25], tokens[:25], seed=0)
    assert small == gen_ppl_interval(nll[:25], tokens[:25], seed=0)
    large = gen_ppl_interval(nll, tokens, seed=0)
    assert large[1] - large[0] < 0.6 * (small[1] - small[0])  # ~ 1/sqrt(16) = 0.25 expected


def test_bad_interval_arguments_name_the_problem():
    with pytest.raises(ValueError, match="at least one sample"):
        mean_interval(np.zeros(0))
    with pytest.raises(ValueError, match="level"):
        mean_interval(np.ones(3), level=1.5)
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        gen_ppl_interval(np.ones(3), np.ones(4))


def test_entropy_per_sample_is_the_brute_force_histogram_entropy():
    ids = torch.tensor([[1, 1, 2, 3], [4, 4, 4, 4], [0, 1, 2, 3]])
    want = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), 0.0, math.log(4)]
    np.testing.assert_allclose(unigram_entropy_per_sample(ids), want, rtol=1e-12, atol=1e-12)
    assert unigram_entropy(ids) == pytest.approx(sum(want) / 3, rel=1e-12)


def _row(label, steps, ppl, lo=None, hi=None):
    return EvalRow(label=label, steps=steps, nfe=float(steps), gen_ppl=ppl, entropy=4.0, num_samples=8, judge="j",
                   device="cpu", gen_ppl_lo=lo, gen_ppl_hi=hi, entropy_lo=None if lo is None else 3.9,
                   entropy_hi=None if lo is None else 4.1)


def test_report_round_trips_intervals_and_shows_them(tmp_path):
    rows = [_row("teacher", 8, 500.0, 450.0, 560.0), _row("student", 8, 300.0)]
    path = write_csv(rows, tmp_path / "t.csv")
    assert read_csv(path) == rows
    table = markdown_table(rows)
    assert "500.00 [450.00, 560.00]" in table and "4.000 [3.900, 4.100]" in table
    assert "gen_ppl_lo" not in table  # the bounds are shown inside the cells, not as columns
    assert "| 300.00 |" in table
    assert plot_curves(rows, tmp_path / "t.png").stat().st_size > 0


def test_report_reads_a_csv_written_before_the_interval_columns(tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("label,steps,nfe,gen_ppl,entropy,mauve,num_samples,judge,device,sample_seconds\n"
                   "teacher,8,8,500,4.2,,16,smollm2,cpu,1.5\n")
    (row,) = read_csv(old)
    assert row.gen_ppl == 500.0 and row.gen_ppl_lo is None and row.entropy_hi is None
