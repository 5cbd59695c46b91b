"""Fused sampling draws (ddistill.kernels.sampling, Triton interpreter on CPU) against the float64 torch path of the
samplers on the same uniforms, their exact draw intervals, a chi-square of the draw distribution, and the samplers
with draw="fused" against draw="torch" on a small DiT."""

import pytest
import torch
from scipy.stats import chisquare

from ddistill.diffusion import LogLinearSchedule, sample_duo, sample_mdlm
from ddistill.diffusion.samplers import sample_categorical
from ddistill.diffusion.uniform import uniform_posterior
from ddistill.kernels.sampling import draw_categorical, draw_uniform_posterior, masked_argmax, softmax_stats
from ddistill.models import ModelConfig, build_model

P_MIN = 1e-4


def _logits(n, v, dtype, seed, pad=0):
    """(n, v) logits as a column slice of an (n, v + pad) tensor (the DiT's padded head), with some -inf entries."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(n, v + pad, generator=g) * 3).to(dtype)
    full[0, 1] = float("-inf")
    full[-1, :3] = float("-inf")
    return full[:, :v]


def _torch_xtheta(logits, u, exclude):
    row = logits.double()
    if exclude is not None:
        row = row.index_fill(-1, torch.tensor([exclude]), float("-inf"))
    return sample_categorical(torch.softmax(row, dim=-1), u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n", "v", "exclude"), [(21, 301, 300), (5, 130, None)])
def test_draw_categorical_equals_torch(dtype, n, v, exclude):
    logits = _logits(n, v, dtype, seed=v, pad=3)
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u[0] = 1.0 - 2.0**-53  # the target rounds up to the total: clamped to the last id with mass
    tokens = draw_categorical(logits, u, exclude=exclude)
    assert torch.equal(tokens, _torch_xtheta(logits, u, exclude))
    if exclude is not None:
        assert (tokens != exclude).all()


@pytest.mark.parametrize(("alpha_t", "alpha_s", "dtype"), [(0.3, 0.6, torch.float32), (0.02, 0.05, torch.float16),
                                                        (0.9, 1.0, torch.float32), (0.9, 1.0, torch.float16)])
def test_draw_uniform_posterior_equals_torch(alpha_t, alpha_s, dtype):
    n, v = 29, 203
    logits = _logits(n, v, dtype, seed=5, pad=1)
    g = torch.Generator().manual_seed(4)
    zt = torch.randint(0, v, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    a_t, a_s = torch.tensor(alpha_t, dtype=torch.float64), torch.tensor(alpha_s, dtype=torch.float64)
    tokens = draw_uniform_posterior(logits, zt, u, a_t, a_s)
    probs = torch.softmax(logits.double(), dim=-1)
    assert torch.equal(tokens, sample_categorical(uniform_posterior(probs, zt, a_t, a_s), u))


def _interval_row(v):
    """One row of logits: 9 columns, or 200 (four 64-column blocks in the interpreter) whose second block has no
    mass at all (-inf), so the CDF's search has to skip a whole block and cross block boundaries."""
    if v == 9:
        return torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 0.3, 1.0, -2.0])
    row = torch.linspace(-2.0, 2.0, v).sin() * 2
    row[64:128] = float("-inf")
    return row


@pytest.mark.parametrize("v", [9, 200])
@pytest.mark.parametrize("alpha_s", [0.7, 1.0])
def test_draws_follow_their_exact_intervals(v, alpha_s):
    """Brute force: token j is drawn exactly for u in [C_{j−1}, C_j) of the float64 CDF (just inside each end), for
    every id (v = 9) or the ids around the block boundaries (v = 200); ids with zero mass (the excluded column, -inf
    logits; for the posterior at α_s = 1 no uniform floor) never are."""
    ids = torch.arange(v) if v == 9 else torch.tensor([0, 1, 62, 63, 64, 100, 127, 128, 129, 191, 192, 198, 199])
    logits = _interval_row(v).expand(2 * len(ids), v)
    zt = torch.full((2 * len(ids),), 4)
    a_t, a_s = torch.tensor(0.4, dtype=torch.float64), torch.tensor(alpha_s, dtype=torch.float64)
    for name, q, draw in (
        ("x_theta", torch.softmax(logits[0].double().index_fill(0, torch.tensor([v - 1]), float("-inf")), 0),
         lambda u: draw_categorical(logits[: len(u)], u, exclude=v - 1)),
        ("posterior", uniform_posterior(torch.softmax(logits[:1].double(), -1), zt[:1], a_t, a_s)[0],
         lambda u: draw_uniform_posterior(logits[: len(u)], zt[: len(u)], u, a_t, a_s)),
    ):
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), q.cumsum(0) / q.sum()])
        inside = torch.stack([cdf[ids] + 1e-9, cdf[ids + 1] - 1e-9], dim=1).reshape(-1)
        keep = q[ids].repeat_interleave(2) > 1e-8  # a zero-mass id has no interval (nor one narrower than the offsets)
        tokens = draw(inside.clamp(0, 1 - 1e-12))
        assert torch.equal(tokens[keep], ids.repeat_interleave(2)[keep]), name
        assert (q[tokens] > 0).all(), name
        if v > 64:  # u exactly at the CDF of a block's end: one of the two neighbouring ids with mass, by rounding
            ends = torch.tensor([64, 128, 192])
            got = draw(cdf[ends])
            positive = torch.nonzero(q > 0).squeeze(1)
            before = torch.stack([positive[positive < e].max() for e in ends])
            after = torch.stack([positive[positive >= e].min() for e in ends])
            assert ((got == before) | (got == after)).all(), name
        top = draw(torch.full((2,), 1.0 - 2.0**-53, dtype=torch.float64))  # the target rounds to the total
        assert (top == int(torch.nonzero(q > 0).max())).all(), name


def test_draw_distribution_chi_square():
    """Draws at fresh uniforms follow softmax (mask column excluded) and the posterior; the bound can fail."""
    n, v = 300, 6  # ~20 ms per row in the interpreter
    row = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 0.7])
    logits = row.expand(n, v)
    g = torch.Generator().manual_seed(9)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    p = torch.softmax(row.double().index_fill(0, torch.tensor([2]), float("-inf")), 0)
    counts = torch.bincount(draw_categorical(logits, u, exclude=2), minlength=v)
    assert counts[2] == 0
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep] * n).numpy()).pvalue > P_MIN
    zt = torch.full((n,), 1)
    a_t, a_s = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    q = uniform_posterior(torch.softmax(row.double(), 0)[None], zt[:1], a_t, a_s)[0]
    counts = torch.bincount(draw_uniform_posterior(logits, zt, u, a_t, a_s), minlength=v)
    assert chisquare(counts.numpy(), (q * n).numpy()).pvalue > P_MIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_argmax_first_maximum(dtype):
    logits = _logits(11, 150, dtype, seed=7, pad=2).clone()
    logits[3, [10, 90]] = 50.0  # a tie: the first index wins
    logits[4, [20, 149]] = 60.0  # the excluded column holds the maximum
    got = masked_argmax(logits, exclude=149)
    expected = torch.softmax(logits.double().index_fill(-1, torch.tensor([149]), float("-inf")), -1).argmax(-1)
    assert torch.equal(got, expected) and got[3] == 10 and got[4] == 20
    assert torch.equal(masked_argmax(logits), torch.softmax(logits.double(), -1).argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("v", "exclude"), [(301, 300), (1500, 7), (130, None)])
def test_softmax_stats_equal_float64(dtype, v, exclude):
    """max_j p_j and the entropy of the softmax over the kept columns, against float64 torch: several blocks a row
    (the running maxima rescaled), -inf entries, a column slice of a padded head, a row maximum in the last block,
    a near one-hot row and a flat row."""
    logits = _logits(9, v, dtype, seed=v, pad=5).clone()
    logits[2, v - 2] = 40.0  # near one-hot, its maximum in the last block
    logits[3] = 0.5  # uniform over the kept columns
    max_prob, entropy = softmax_stats(logits, exclude=exclude)
    row = logits.double()
    if exclude is not None:
        row = row.index_fill(-1, torch.tensor([exclude]), float("-inf"))
    p = torch.softmax(row, dim=-1)
    expected_entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)
    assert max_prob.dtype == entropy.dtype == torch.float32 and max_prob.shape == (9,)
    torch.testing.assert_close(max_prob.double(), p.max(-1).values, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=2e-6, atol=2e-6)
    kept = v - (exclude is not None)
    assert float(entropy[3]) == pytest.approx(torch.log(torch.tensor(float(kept))).item(), rel=1e-6)
    batched = softmax_stats(logits.reshape(3, 3, v), exclude=exclude)
    assert batched[0].shape == (3, 3) and torch.equal(batched[1].reshape(-1), entropy)


def test_bad_arguments_are_refused():
    logits = torch.zeros(4, 7)
    with pytest.raises(ValueError, match="exclude"):
        draw_categorical(logits, torch.zeros(4, dtype=torch.float64), exclude=7)
    with pytest.raises(ValueError, match="u of shape"):
        draw_categorical(logits, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating point"):
        masked_argmax(torch.zeros(4, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="exclude"):
        softmax_stats(logits, exclude=-1)


def _small_dit(vocab, time_conditioning):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=vocab, length=8, time_conditioning=time_conditioning,
                                    dropout=0.0)).eval()
    with torch.no_grad():  # zero-initialised output layers would make every draw uniform
        for prm in model.parameters():
            if prm.dim() >= 2 and prm.abs().sum() == 0:
                prm.normal_(0, 0.5)
    return model


@pytest.mark.parametrize(("num_steps", "greedy_tail"), [(3, False), (5, True)])
def test_mdlm_fused_equals_torch_on_a_small_dit(num_steps, greedy_tail):
    """Fused draws on the DiT's row-selected logits (rows=positions) = torch draws on its full logits."""
    vocab = 37
    model = _small_dit(vocab, time_conditioning=False)
    kw = dict(batch_size=2, length=8, num_steps=num_steps, mask_id=vocab - 1, vocab_size=vocab,
              schedule=LogLinearSchedule(), cached=True, device="cpu", greedy_tail=greedy_tail, t_end=0.05,
              prefix=torch.tensor([[3], [5]]))
    fused = sample_mdlm(model, generator=torch.Generator().manual_seed(1), draw="fused", row_logits=True, **kw)
    ref = sample_mdlm(model, generator=torch.Generator().manual_seed(1), draw="torch", **kw)
    assert torch.equal(fused.tokens, ref.tokens) and fused.nfe == ref.nfe
    assert (fused.tokens != vocab - 1).all() and len(set(fused.tokens.reshape(-1).tolist())) > 3


@pytest.mark.parametrize("greedy_tail", [False, True])
def test_duo_fused_equals_torch_on_a_small_dit(greedy_tail):
    vocab = 41
    model = _small_dit(vocab, time_conditioning=True)
    kw = dict(batch_size=2, length=8, num_steps=3, vocab_size=vocab, schedule=LogLinearSchedule(), device="cpu",
              greedy_tail=greedy_tail, prefix=torch.tensor([[7], [9]]))
    fused = sample_duo(model, generator=torch.Generator().manual_seed(2), draw="fused", **kw)
    ref = sample_duo(model, generator=torch.Generator().manual_seed(2), draw="torch", **kw)
    assert torch.equal(fused.tokens, ref.tokens) and fused.nfe == ref.nfe == 4
    assert (fused.tokens[:, 0] == torch.tensor([7, 9])).all()


def test_fused_draw_needs_the_exact_float64_draw():
    kw = dict(batch_size=1, length=2, num_steps=1, vocab_size=5, schedule=LogLinearSchedule(), device="cpu",
              generator=torch.Generator())
    with pytest.raises(ValueError, match="nucleus_p=1"):
        sample_duo(lambda x, s: torch.zeros(*x.shape, 5), nucleus_p=0.9, draw="fused", **kw)
    with pytest.raises(ValueError, match="draw='gpu'"):
        sample_mdlm(lambda x, s: torch.zeros(*x.shape, 5), mask_id=4, draw="gpu", **kw)


def test_dit_row_positions_equal_full_logits_and_bad_shapes_are_refused():
    """DiT.forward(rows=positions): the full logits at those flat positions (what row_logits=True relies on)."""
    vocab = 37
    model = _small_dit(vocab, time_conditioning=False)
    x = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(3))
    sigma = torch.zeros(2)
    positions = torch.tensor([0, 5, 9, 15])
    with torch.no_grad():
        full = model(x, sigma).reshape(-1, vocab)
        assert torch.allclose(model(x, sigma, rows=positions), full[positions], atol=1e-5, rtol=1e-5)
        assert model(x, sigma, rows=positions[:0]).shape == (0, vocab)
        with pytest.raises(ValueError, match="1-D positions"):
            model(x, sigma, rows=positions.float())
    kw = dict(batch_size=1, length=4, num_steps=2, mask_id=4, vocab_size=5, schedule=LogLinearSchedule(),
              device="cpu", generator=torch.Generator(), row_logits=True)
    with pytest.raises(ValueError, match="rows=…"):
        sample_mdlm(lambda x, s, rows: torch.zeros(*x.shape, 5), **kw)  # ignores rows: full logits
