"""SDTT (ddistill.methods.sdtt): teacher targets vs brute-force enumeration, divergences vs their float64
definitions, the loss of one step in closed form, round transitions and mid-round resume with a fake engine."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
import torch

from ddistill.config import ConfigError, from_dict
from ddistill.diffusion.schedules import LogLinearSchedule
from ddistill.methods import get_method
from ddistill.methods.base import StepContext
from ddistill.methods.sdtt import (
    SDTT,
    SDTTConfig,
    divergence_per_token,
    masked_row_log_probs,
    sample_from_log_probs,
    teacher_step_times,
    teacher_targets,
)

EPS = 1e-3  # log-linear schedule: α_t = 1 − (1 − EPS) t
V, MASK = 4, 3  # ids 0, 1, 2 and [MASK] = 3

# A hand-made denoiser whose logits depend on the input tokens (so every teacher step predicts differently) and on σ
# (so the step times matter): logit[b, l, v] = BASE[l, v] + 0.7 (l + 1) #{l' : x[b, l'] = v} + 0.5 σ_b (v + 1).
BASE = np.array(
    [[0.3, -0.2, 0.9, 5.0], [-0.6, 0.4, 0.1, -5.0], [1.1, 0.0, -0.8, 2.0]], dtype=np.float64
)


def toy_logits_np(z: tuple[int, ...], sigma: float) -> np.ndarray:
    length = len(z)
    counts = np.array([sum(1 for tok in z if tok == v) for v in range(V)], dtype=np.float64)
    ls = np.arange(1, length + 1, dtype=np.float64)[:, None]
    return BASE[:length] + 0.7 * ls * counts[None, :] + 0.5 * sigma * np.arange(1, V + 1, dtype=np.float64)[None, :]


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    length = x.shape[1]
    counts = torch.nn.functional.one_hot(x, V).sum(1).double()  # (B, V)
    ls = torch.arange(1, length + 1, dtype=torch.float64)[None, :, None]
    base = torch.from_numpy(BASE[:length])[None]
    vs = torch.arange(1, V + 1, dtype=torch.float64)
    return (base + 0.7 * ls * counts[:, None, :] + 0.5 * sigma.double()[:, None, None] * vs).float()


def brute_force(xt: tuple[int, ...], t: float, dt: float, k: int):
    """Exact moments of the SDTT targets by enumerating every teacher trajectory, in float64 (independent code).

    Returns E[target], E[target²] of shape (L, V−1) (non-[MASK] columns; rows of masked positions only are
    meaningful), P(reveal step = j) of shape (L, k + 1), and P(final token = v) of shape (L, V).
    """
    length = len(xt)
    times = [max(t - j * dt / k, 0.0) for j in range(k + 1)]
    alpha = lambda s: 1.0 - (1.0 - EPS) * s  # noqa: E731

    def log_probs(z, tj):
        logits = toy_logits_np(z, -math.log(alpha(tj)))[:, :MASK]
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    mean = np.zeros((length, V - 1))
    second = np.zeros((length, V - 1))
    reveal = np.zeros((length, k + 1))
    final = np.zeros((length, V))

    def recurse(j, z, prob, target, step_of):
        if j == k:
            for pos in range(length):
                if xt[pos] != MASK:
                    continue
                mean[pos] += prob * target[pos]
                second[pos] += prob * target[pos] ** 2
                reveal[pos, step_of.get(pos, k)] += prob
            for pos in range(length):
                final[pos, z[pos]] += prob
            return
        lp = log_probs(z, times[j])
        r = 1.0 if alpha(times[j]) >= 1.0 else (alpha(times[j + 1]) - alpha(times[j])) / (1.0 - alpha(times[j]))
        masked = [pos for pos in range(length) if z[pos] == MASK]
        target = dict(target)
        for pos in masked:  # still-masked positions take this step's prediction (overwritten at later steps)
            target[pos] = lp[pos]
        for outcome in itertools.product([None, *range(V - 1)], repeat=len(masked)):
            p = prob
            z2 = list(z)
            step2 = dict(step_of)
            for pos, tok in zip(masked, outcome):
                if tok is None:
                    p *= 1.0 - r
                else:
                    p *= r * math.exp(lp[pos, tok])
                    z2[pos] = tok
                    step2[pos] = j
            if p > 0:
                recurse(j + 1, tuple(z2), p, target, step2)

    recurse(0, tuple(xt), 1.0, {}, {})
    return mean, second, reveal, final


@pytest.mark.parametrize(
    "xt, t, dt, k",
    [
        ((MASK, MASK, MASK), 0.5, 0.4, 2),  # the paper's 2 steps: t, t − Δ/2, t − Δ
        ((1, MASK, MASK), 0.3, 0.4, 2),  # t − Δ < 0: the times clamp to 0 and the last step reveals everything
        ((MASK, 2, MASK), 0.9, 0.6, 3),  # 3 teacher steps
    ],
)
def test_teacher_targets_match_brute_force(xt, t, dt, k):
    num = 40_000
    mean, second, reveal, final = brute_force(xt, t, dt, k)
    gen = torch.Generator().manual_seed(1234)
    x = torch.tensor(xt).repeat(num, 1)
    out = teacher_targets(
        toy_denoiser, x, torch.full((num,), t, dtype=torch.float64), dt, k, LogLinearSchedule(eps=EPS), MASK, gen
    )
    assert out.log_probs.shape == (num, len(xt), V) and out.log_probs.dtype == torch.float32
    masked = [pos for pos in range(len(xt)) if xt[pos] == MASK]
    lp = out.log_probs[:, :, :MASK].double().numpy()
    for pos in masked:
        sd = np.sqrt(np.maximum(second[pos] - mean[pos] ** 2, 0.0))
        np.testing.assert_array_less(np.abs(lp[:, pos].mean(0) - mean[pos]), 5 * sd / math.sqrt(num) + 1e-5)
        assert torch.isneginf(out.log_probs[:, pos, MASK]).all()
        freq = np.array([(out.reveal_step[:, pos] == j).double().mean().item() for j in range(k + 1)])
        tol = 5 * np.sqrt(reveal[pos] * (1 - reveal[pos]) / num) + 1e-9
        np.testing.assert_array_less(np.abs(freq - reveal[pos]), tol)
    tok_freq = torch.nn.functional.one_hot(out.tokens, V).double().mean(0).numpy()
    np.testing.assert_array_less(np.abs(tok_freq - final), 5 * np.sqrt(final * (1 - final) / num) + 1e-9)
    for pos in range(len(xt)):
        if xt[pos] != MASK:  # carry-over rows and tokens for positions unmasked in x_t
            assert (out.reveal_step[:, pos] == -1).all() and (out.tokens[:, pos] == xt[pos]).all()
            assert (out.log_probs[:, pos, xt[pos]] == 0).all()


def test_teacher_targets_are_deterministic_given_the_draws():
    """The target of a position revealed at step 0 is exactly the teacher's prediction at x_t; the others are the
    prediction at x_t plus the step-0 tokens, i.e. at the returned state before step 1's own reveals."""
    num = 64
    gen = torch.Generator().manual_seed(7)
    xt = torch.full((num, 3), MASK)
    t = torch.full((num,), 0.8, dtype=torch.float64)
    out = teacher_targets(toy_denoiser, xt, t, 0.5, 2, LogLinearSchedule(eps=EPS), MASK, gen)
    sched = LogLinearSchedule(eps=EPS)
    first = torch.log_softmax(toy_denoiser(xt, sched.sigma(t).float())[..., :MASK].double(), -1)
    z1 = torch.where(out.reveal_step == 0, out.tokens, MASK)
    second = torch.log_softmax(toy_denoiser(z1, sched.sigma(t - 0.25).float())[..., :MASK].double(), -1)
    expected = torch.where((out.reveal_step == 0).unsqueeze(-1), first, second)
    assert 0 < (out.reveal_step == 0).sum() < out.reveal_step.numel()
    torch.testing.assert_close(out.log_probs[..., :MASK].double(), expected, atol=1e-5, rtol=0)


def test_teacher_step_times_are_t_then_t_minus_half_dt():
    """The reference's bug (t_start·space + (1 − t_start)·t_end) is not reproduced: σ inputs are σ(t), σ(t − Δ/2)."""
    seen = []

    def spy(x, sigma):
        seen.append(sigma.clone())
        return torch.zeros(*x.shape, V)

    sched = LogLinearSchedule(eps=EPS)
    t = torch.tensor([0.5, 0.9, 0.01], dtype=torch.float64)
    teacher_targets(spy, torch.full((3, 4), MASK), t, 1 / 8, 2, sched, MASK, torch.Generator().manual_seed(0))
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], sched.sigma(t).float())
    torch.testing.assert_close(seen[1], sched.sigma((t - 1 / 16).clamp_min(0)).float())
    times = teacher_step_times(t, 1 / 8, 2)
    torch.testing.assert_close(times[2], torch.tensor([0.375, 0.775, 0.0], dtype=torch.float64))


def test_teacher_targets_split_invariant_over_micro_batches():
    sched = LogLinearSchedule(eps=EPS)
    xt = torch.full((6, 3), MASK)
    xt[1, 0] = 2
    t = torch.linspace(0.2, 1.0, 6, dtype=torch.float64)
    full = teacher_targets(toy_denoiser, xt, t, 0.5, 2, sched, MASK, torch.Generator().manual_seed(3), global_batch=6)
    parts = []
    for offset in (0, 2, 4):
        gen = torch.Generator().manual_seed(3)
        parts.append(
            teacher_targets(
                toy_denoiser, xt[offset : offset + 2], t[offset : offset + 2], 0.5, 2, sched, MASK, gen,
                global_batch=6, offset=offset,
            )
        )
    assert torch.equal(full.tokens, torch.cat([p.tokens for p in parts]))
    assert torch.equal(full.log_probs, torch.cat([p.log_probs for p in parts]))


def test_sample_from_log_probs_inverse_cdf():
    lp = torch.log(torch.tensor([[0.2, 0.0, 0.5, 0.3]] * 4, dtype=torch.float64))
    u = torch.tensor([0.0, 0.1999, 0.2, 0.9999], dtype=torch.float64)
    assert sample_from_log_probs(lp, u).tolist() == [0, 0, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Divergences
# ----------------------------------------------------------------------------------------------------------------


def _random_rows(num, vocab, mask, seed):
    g = torch.Generator().manual_seed(seed)
    s = masked_row_log_probs(torch.randn(num, vocab, generator=g, dtype=torch.float64) * 2, mask, torch.float64)
    t = masked_row_log_probs(torch.randn(num, vocab, generator=g, dtype=torch.float64) * 2, mask, torch.float64)
    return s, t


def _definition(kind, ls, lt):
    out = []
    for row_s, row_t in zip(ls.tolist(), lt.tolist()):
        ps = [math.exp(a) for a in row_s]
        pt = [math.exp(b) for b in row_t]
        pairs = [(a, b, p, q) for a, b, p, q in zip(row_s, row_t, ps, pt) if not (a == -math.inf and b == -math.inf)]
        if kind == "kl_rev":
            out.append(sum(p * (a - b) for a, b, p, q in pairs))
        elif kind == "kl_fwd":
            out.append(sum(q * (b - a) for a, b, p, q in pairs))
        elif kind == "tvd":
            out.append(0.5 * sum(abs(p - q) for p, q in zip(ps, pt)))
        else:
            out.append(sum((a - b) ** 2 for a, b, p, q in pairs) / len(row_s))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd", "tvd", "mse"])
def test_divergences_match_definitions(kind):
    ls, lt = _random_rows(9, 11, mask=4, seed=0)
    got = divergence_per_token(ls.clone().requires_grad_(True), lt, kind)
    torch.testing.assert_close(got.detach(), _definition(kind, ls, lt), rtol=1e-12, atol=1e-12)
    assert (got.detach() > 0).all()
    # Identical distributions: zero divergence, and finite (zero) gradients despite the −∞ [MASK] column.
    same = ls.clone().requires_grad_(True)
    d = divergence_per_token(same, ls.clone(), kind)
    torch.testing.assert_close(d.detach(), torch.zeros(9, dtype=torch.float64), atol=1e-12, rtol=0)
    d.sum().backward()
    assert torch.isfinite(same.grad).all()
    # fp32 inputs stay fp32 and agree with float64.
    got32 = divergence_per_token(ls.float(), lt.float(), kind)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), _definition(kind, ls, lt), rtol=1e-4, atol=1e-5)


def test_reverse_kl_gradient_matches_float64_finite_differences():
    ls, lt = _random_rows(2, 5, mask=4, seed=1)
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def f(z):
        return divergence_per_token(masked_row_log_probs(z, 4, torch.float64), lt, "kl_rev").sum()

    torch.autograd.gradcheck(f, (logits,))


def test_unknown_divergence_is_an_error():
    ls, lt = _random_rows(2, 5, mask=4, seed=1)
    with pytest.raises(ValueError, match="kl_rev"):
        divergence_per_token(ls, lt, "tv")
    with pytest.raises(ConfigError, match="divergence"):
        from_dict(SDTTConfig, {"divergence": "tvd_l1"})


# ----------------------------------------------------------------------------------------------------------------
# One step: loss in closed form (normalised per masked token)
# ----------------------------------------------------------------------------------------------------------------


def _ctx(step, *, offset=0, global_batch=8, seed=0):
    return StepContext(
        step=step, micro_step=0, global_offset=offset, global_batch_size=global_batch,
        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), rank=0, world_size=1,
    )


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd", "tvd", "mse"])
@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_step_loss_is_mean_over_masked_tokens_of_the_global_batch(kind, precision):
    """Constant (input-independent) student and teacher: every masked token has the same divergence D, so the
    step's loss — the mean of its micro-batches' losses, as the engine averages them — equals D (a sum, a mean over
    all tokens, or a mean of per-micro-batch means would not), and each micro-batch's loss is D times its share
    (masked tokens of the micro-batch / masked tokens of the global batch) · (G / B)."""
    vocab, mask, micro, total = 9, 8, 4, 8
    g = torch.Generator().manual_seed(5)
    s_logits = torch.randn(vocab, generator=g, dtype=torch.float64)
    t_logits = torch.randn(vocab, generator=g, dtype=torch.float64)
    student_param = torch.nn.Parameter(s_logits.clone().float())
    nets = {
        "student": lambda x, sigma, rows=None: student_param.expand(*x.shape, vocab)[rows],
        "teacher": lambda x, sigma: t_logits.float().expand(*x.shape, vocab),
    }
    cfg = SDTTConfig(divergence=kind, loss_precision=precision, initial_teacher_steps=16, num_rounds=3)
    method = SDTT(cfg, vocab_size=vocab, mask_id=mask)
    batch = torch.randint(0, mask, (total, 32), generator=g)
    outs = [method.step(nets, batch[o : o + micro], _ctx(0, offset=o, global_batch=total)) for o in (0, micro)]
    expected = divergence_per_token(
        masked_row_log_probs(s_logits[None], mask, torch.float64),
        masked_row_log_probs(t_logits[None], mask, torch.float64),
        kind,
    )[0]
    tol = 1e-5 if precision == "fp32" else 1e-6
    step_loss = sum(out.losses["student"].double() for out in outs) / len(outs)
    torch.testing.assert_close(step_loss, expected, rtol=tol, atol=tol)
    counts = [float(out.metrics["masked_tokens"]) for out in outs]
    assert counts[0] != counts[1]  # unequal shares: the per-micro-batch mean would differ from the global mean
    for out, count in zip(outs, counts):
        share = count / sum(counts) * (total / micro)
        torch.testing.assert_close(out.losses["student"].double(), expected * share, rtol=tol, atol=tol)
    assert out.losses["student"].dtype == torch.float32 and out.metrics["masked_tokens"] > 0
    out.losses["student"].backward()
    assert student_param.grad is not None and torch.isfinite(student_param.grad).all()


def test_step_is_split_invariant():
    """The same global batch of 8 split into micro-batches of 4 gives the same targets and losses."""
    vocab, mask = 5, 4
    model = torch.nn.Embedding(vocab, vocab)

    def net(x, sigma, rows=None):
        logits = model(x) + sigma[:, None, None]
        return logits if rows is None else logits[rows]

    nets = {"student": net, "teacher": lambda x, s: net(x, s).detach()}
    method = SDTT(SDTTConfig(initial_teacher_steps=8, num_rounds=2), vocab_size=vocab, mask_id=mask)
    batch = torch.randint(0, mask, (8, 16), generator=torch.Generator().manual_seed(1))
    whole = method.step(nets, batch, _ctx(0, global_batch=8, seed=9))
    halves = [method.step(nets, batch[o : o + 4], _ctx(0, offset=o, global_batch=8, seed=9)) for o in (0, 4)]
    masked = sum(h.metrics["masked_tokens"] for h in halves)
    assert masked == whole.metrics["masked_tokens"]
    combined = sum(h.losses["student"] * h.metrics["masked_tokens"] for h in halves) / masked
    torch.testing.assert_close(combined, whole.losses["student"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Rounds and resume
# ----------------------------------------------------------------------------------------------------------------


class FakeControl:
    def __init__(self):
        self.events = []

    def copy_weights(self, dst, src, *, use_ema=False):
        self.events.append(("copy", dst, src, use_ema))

    def reset_optimizer(self, name):
        self.events.append(("reset", name))


def test_paper_schedule_512_to_8_student_steps():
    cfg = SDTTConfig()
    assert [cfg.student_steps(r) for r in range(cfg.num_rounds)] == [512, 256, 128, 64, 32, 16, 8]
    assert cfg.steps_per_round == 10_000 and cfg.divergence == "kl_rev" and cfg.num_teacher_steps == 2
    method = get_method("sdtt")(cfg, vocab_size=50258, mask_id=50257)
    assert method.sampler_spec() == {"process": "absorbing", "num_steps": 512, "schedule": "loglinear", "t_end": 1e-5}
    assert method.student_dt == pytest.approx((1 - 1e-5) / 512, rel=1e-15)  # 2 steps of the 1024-step teacher grid
    specs = method.networks()
    assert specs["student"].role == "trained" and specs["student"].ema and specs["student"].init == "pretrained"
    assert specs["teacher"].role == "frozen" and specs["teacher"].init == "pretrained"
    with pytest.raises(ConfigError, match="initial_teacher_steps"):
        from_dict(SDTTConfig, {"initial_teacher_steps": 1000})


@pytest.mark.parametrize("teacher_from, reset", [("raw", False), ("ema", True)])
def test_round_transitions(teacher_from, reset):
    cfg = SDTTConfig(steps_per_round=3, num_rounds=3, initial_teacher_steps=16, teacher_from=teacher_from,
                     reset_optimizer_on_round=reset)
    method = SDTT(cfg, vocab_size=5, mask_id=4)
    control = FakeControl()
    history = []
    for step in range(12):
        history.append((step, method.round, method.student_steps))
        method.on_step_end(step, control)
    copy = ("copy", "teacher", "student", teacher_from == "ema")
    expected_events = [copy, ("reset", "student")] * 2 if reset else [copy, copy]
    assert control.events == expected_events
    # Rounds of 3 steps: 8 student steps (Δ = 1/8), then 4, then 2; the last round extends past its end.
    assert [h[2] for h in history] == [8] * 3 + [4] * 3 + [2] * 6
    assert method.state_dict()["teacher_updated_at"] == 6


def test_mid_round_resume_matches_uninterrupted_run():
    cfg = SDTTConfig(steps_per_round=4, num_rounds=4, initial_teacher_steps=32)
    straight, control_a = SDTT(cfg, vocab_size=5, mask_id=4), FakeControl()
    for step in range(14):
        straight.on_step_end(step, control_a)

    first, control_b = SDTT(cfg, vocab_size=5, mask_id=4), FakeControl()
    for step in range(6):  # stop in the middle of round 1
        first.on_step_end(step, control_b)
    state = first.state_dict()
    assert state["round"] == 1 and state["student_steps"] == 8
    resumed = SDTT(cfg, vocab_size=5, mask_id=4)
    resumed.load_state_dict(state)
    assert resumed.sampler_spec()["num_steps"] == 8
    for step in range(6, 14):
        resumed.on_step_end(step, control_b)
    assert control_b.events == control_a.events and resumed.state_dict() == straight.state_dict()

    # A fresh method (state not restored) refuses to train a step of round 1 with round 0's schedule.
    fresh = SDTT(cfg, vocab_size=5, mask_id=4)
    with pytest.raises(RuntimeError, match="round"):
        fresh.step({}, torch.zeros(1, 4, dtype=torch.long), _ctx(6, global_batch=1))
    # The round schedule cannot change in the middle of a run.
    other = SDTT(SDTTConfig(steps_per_round=5, num_rounds=4, initial_teacher_steps=32), vocab_size=5, mask_id=4)
    with pytest.raises(ValueError, match="steps_per_round"):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------------------
# Fused (Triton) loss path == torch path, with real test-size DiTs
# ----------------------------------------------------------------------------------------------------------------


class _Net:
    """The part of the engine's `Network` that SDTT uses, around a plain DiT."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, sigma, rows=None):
        return self.model(x, sigma, rows)

    def hidden_states(self, x, sigma):
        return self.model.hidden_states(x, sigma)

    def head_dtype(self, device):
        return self.model.head_dtype(device)

    @property
    def output_weight(self):
        return self.model.output_weight

    @property
    def output_bias(self):
        return self.model.output_bias

    @contextlib.contextmanager
    def gathered_output(self):
        yield self.model.output_weight, self.model.output_bias


def _random_dit(seed, vocab):
    from ddistill.models.dit import ModelConfig, build_model

    torch.manual_seed(seed)
    model = build_model(ModelConfig(size="test", vocab_size=vocab, dropout=0.0, time_conditioning=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd", "tvd"])
def test_fused_loss_matches_torch_loss(kind):
    vocab, mask = 37, 36
    student, teacher = _random_dit(0, vocab), _random_dit(1, vocab).eval()
    batch = torch.randint(0, mask, (4, 24), generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in ("torch", "triton", "chunked"):
        cfg = SDTTConfig(divergence=kind, loss_impl=impl, initial_teacher_steps=16, num_rounds=3, t_min=0.3)
        method = SDTT(cfg, vocab_size=vocab, mask_id=mask)
        student.zero_grad()
        out = method.step({"student": _Net(student), "teacher": _Net(teacher)}, batch, _ctx(0, global_batch=4, seed=4))
        out.losses["student"].backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results[impl] = (out.losses["student"].detach(), grads, out.metrics["teacher_step0_reveal_frac"])
    assert results["torch"][2] > 0  # some positions were revealed by the first teacher step
    for impl in ("triton", "chunked"):
        torch.testing.assert_close(results[impl][0], results["torch"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[impl][1], results["torch"][1], rtol=1e-3, atol=1e-5)
    assert results["torch"][0] > 0
    with pytest.raises(ConfigError, match="loss_impl"):
        from_dict(SDTTConfig, {"loss_impl": "triton", "divergence": "mse"})
