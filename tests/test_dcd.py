"""DCD (methods/dcd.py): the cheap trajectory sampler has the joint law of the naive argmax pair (z_t, z_s); the loss is
the divergence of the student at (z_t, t) from the teacher at (z_s, t − δ); δ doubles and the teacher is swapped at
round boundaries, and a resumed tracker continues identically."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from ddistill.config import ConfigError, from_dict
from ddistill.diffusion.duality import DualityTable, gaussian_scales, sample_top_noise
from ddistill.diffusion.schedules import sample_times
from ddistill.methods.base import StepContext
from ddistill.methods.dcd import DCD, DCDConfig, consistency_divergence, trajectory_tokens


def _ctx(step=0, offset=0, gbs=4, seed=11):
    return StepContext(step=step, micro_step=0, global_offset=offset, global_batch_size=gbs,
                       generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), rank=0, world_size=1)


def test_trajectory_sampler_has_the_joint_law_of_the_naive_argmax():
    vocab, n = 5, 30_000
    gamma = torch.tensor([-1.2, -2.2], dtype=torch.float64)  # t, then the less noisy s
    (a_t, a_s), (s_t, s_s) = gaussian_scales(gamma)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (1, n), generator=gen)
    top = sample_top_noise(x[0], vocab, 1, gen)
    cheap = [trajectory_tokens(x, (a / s).reshape(1), top.clean[None], top.values[None, :, 0], top.indices[None, :, 0])
             for a, s in ((a_t, s_t), (a_s, s_s))]
    eps = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(x[0], vocab).double()
    naive = [(a * one_hot + s * eps).argmax(-1)[None] for a, s in ((a_t, s_t), (a_s, s_s))]
    tables = []
    for z_t, z_s in (cheap, naive):
        cell = ((z_t - x) % vocab) * vocab + (z_s - x) % vocab  # the joint outcome relative to x
        tables.append(torch.bincount(cell[0], minlength=vocab * vocab).numpy())
        assert bool(((z_t == x) <= (z_s == x)).all())  # a token that is clean at t stays clean at s < t
        assert bool(((z_t != x) & (z_s != x) <= (z_t == z_s)).all())  # one flip at most: the same j* before it
    observed = [[a, b] for a, b in zip(*tables) if a + b > 0]
    assert len(observed) >= vocab  # (x, x), (j, x), (j, j) for the K − 1 ids j
    assert stats.chi2_contingency(observed).pvalue > 1e-3


class _Recorder:
    def __init__(self, seed, vocab):
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls = []

    def __call__(self, x, sigma, rows=None):
        self.calls.append((x.clone(), sigma.clone()))
        return (self.table[x] * (1 + sigma[:, None, None].double())).float()


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd"])
def test_loss_is_the_divergence_of_student_at_t_from_teacher_at_t_minus_delta(kind):
    vocab = 7
    cfg = DCDConfig(divergence=kind, base_num_steps=8, num_rounds=3, steps_per_round=2, gamma_min=-3.0,
                    gamma_max=-0.5)
    method = DCD(cfg, vocab_size=vocab, mask_id=vocab - 1)
    student, teacher = _Recorder(0, vocab), _Recorder(1, vocab)
    x0 = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(2))
    out = method.step({"student": student, "teacher": teacher}, x0, _ctx())
    (z_t, sig_t), (z_s, sig_s) = student.calls[0], teacher.calls[0]
    # The times are the step generator's first draw (stratified), shifted by δ = 1/8 and clipped to 1.
    t = sample_times(4, global_batch=4, offset=0, generator=_ctx().generator, device="cpu", t_min=cfg.t_min,
                     dtype=torch.float64)
    t = (t + 1 / 8).clamp(max=1.0)
    table = DualityTable(vocab, gamma_min=-3.0, gamma_max=-0.5)
    for time, sig in ((t, sig_t), (t - 1 / 8, sig_s)):
        expected = -torch.log(table.alpha(-3.0 + time * 2.5))
        torch.testing.assert_close(sig.double(), expected, rtol=1e-6, atol=1e-6)
    assert bool((z_s == x0).sum() >= (z_t == x0).sum()) and bool((z_t != x0).any())
    reference = consistency_divergence(student(z_t, sig_t).double(), teacher(z_s, sig_s).double(), kind,
                                       torch.float64).mean()
    torch.testing.assert_close(out.losses["student"].double(), reference, rtol=1e-5, atol=1e-7)
    p, q = (torch.softmax(n(z, s).double(), -1) for n, z, s in ((student, z_t, sig_t), (teacher, z_s, sig_s)))
    direct = (p * (p / q).log()).sum(-1) if kind == "kl_rev" else (q * (q / p).log()).sum(-1)
    torch.testing.assert_close(reference, direct.mean(), rtol=1e-10, atol=1e-12)


def test_step_does_not_depend_on_the_split_of_the_global_batch():
    vocab = 9
    method = DCD(DCDConfig(), vocab_size=vocab, mask_id=vocab - 1)
    nets = {"student": _Recorder(0, vocab), "teacher": _Recorder(1, vocab)}
    x0 = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(3))
    whole = method.step(nets, x0, _ctx())
    halves = [method.step(nets, x0[o:o + 2], _ctx(offset=o)) for o in (0, 2)]
    torch.testing.assert_close(whole.losses["student"], sum(h.losses["student"] for h in halves) / 2,
                               rtol=1e-6, atol=1e-8)


class _Control:
    def __init__(self):
        self.events = []

    def copy_weights(self, dst, src, *, use_ema=False):
        self.events.append(("copy", dst, src, use_ema))

    def reset_optimizer(self, name):
        self.events.append(("reset", name))


@pytest.mark.parametrize("teacher_from", ["raw", "ema"])
def test_rounds_double_delta_swap_the_teacher_and_resume(teacher_from):
    cfg = DCDConfig(base_num_steps=16, num_rounds=3, steps_per_round=3, teacher_from=teacher_from)
    straight, control = DCD(cfg, vocab_size=9, mask_id=8), _Control()
    deltas = []
    for step in range(11):
        deltas.append(straight.delta)
        straight.on_step_end(step, control)
    assert deltas == [1 / 16] * 3 + [2 / 16] * 3 + [4 / 16] * 5
    assert control.events == [("copy", "teacher", "student", teacher_from == "ema")] * 2

    first, control_b = DCD(cfg, vocab_size=9, mask_id=8), _Control()
    for step in range(4):  # stop inside round 1
        first.on_step_end(step, control_b)
    resumed = DCD(cfg, vocab_size=9, mask_id=8)
    resumed.load_state_dict(first.state_dict())
    assert resumed.delta == 2 / 16
    for step in range(4, 11):
        resumed.on_step_end(step, control_b)
    assert control_b.events == control.events and resumed.state_dict() == straight.state_dict()
    with pytest.raises(RuntimeError, match="round"):
        DCD(cfg, vocab_size=9, mask_id=8).step({}, torch.zeros(1, 4, dtype=torch.long), _ctx(step=4, gbs=1))
    with pytest.raises(ValueError, match="base_num_steps"):
        DCD(DCDConfig(base_num_steps=32, num_rounds=3, steps_per_round=3), vocab_size=9,
            mask_id=8).load_state_dict(first.state_dict())
    assert [(s.label, s.step, s.sampler) for s in straight.eval_students()] == [
        ("round 1", 3, "duo"), ("round 2", 6, "duo"), ("round 3", 9, "duo")]


def test_recipe_defaults_and_config_errors():
    cfg = DCDConfig()
    assert (cfg.base_num_steps, cfg.num_rounds, cfg.steps_per_round, cfg.gamma_min, cfg.gamma_max) == (
        512, 5, 10_000, -4.0, -1.0)
    assert [cfg.delta(r) for r in range(5)] == [1 / 512, 1 / 256, 1 / 128, 1 / 64, 1 / 32]
    specs = DCD(cfg, vocab_size=9, mask_id=8).networks()
    assert specs["student"].ema and specs["student"].init == "pretrained" and specs["teacher"].role == "frozen"
    with pytest.raises(ConfigError, match="num_rounds"):
        from_dict(DCDConfig, {"num_rounds": 4, "base_num_steps": 4})
    with pytest.raises(ConfigError, match="divergence"):
        from_dict(DCDConfig, {"divergence": "tvd"})
    with pytest.raises(ConfigError, match="teacher_from"):
        from_dict(DCDConfig, {"teacher_from": "best"})
