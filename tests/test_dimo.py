"""DiMO (methods/dimo.py) on toy networks against float64 brute force: x_init, where the embedding noise goes, no
carry-over in the generator, the injected generator gradient, the auxiliary loss; and the DiMO sampler."""

from __future__ import annotations

import math

import pytest
import torch

from ddistill.diffusion.samplers import dimo_initial_tokens, sample_dimo
from ddistill.methods.base import StepContext
from ddistill.methods.dimo import DiMO, DiMOConfig, remask_ratio

V, L, D = 13, 10, 6  # vocabulary (mask = V - 1), length, embedding width
MASK = V - 1


class _Module:
    class config:
        hidden_size = D

    def __init__(self, rms):
        self.rms = rms

    def input_embedding_rms_tensor(self):
        return torch.tensor(self.rms)


class ToyNet:
    """logits = table[x] (+ noise·proj when embed_noise is given), float64; records every call."""

    def __init__(self, seed, *, constant=None, rms=0.5):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=gen, dtype=torch.float64)
        self.proj = torch.randn(D, V, generator=gen, dtype=torch.float64)
        self.constant = constant
        self.module = _Module(rms)
        self.calls = []
        self.outputs = []

    def __call__(self, x, sigma, rows=None, **kwargs):
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(), "rows": rows, **kwargs})
        logits = self.table[x].clone()
        if "embed_noise" in kwargs:
            scale, noise = kwargs["embed_noise"]
            logits = logits + scale * noise.double() @ self.proj
        if self.constant is not None:
            logits = torch.full_like(logits, -5.0)
            logits[..., self.constant] = 5.0
        logits.requires_grad_(True)
        self.outputs.append(logits)
        return logits if rows is None else logits[rows]


def ctx(phase, gbs=4, offset=0, seed=3):
    return StepContext(step=0, micro_step=0, global_offset=offset, global_batch_size=gbs,
                       generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"), rank=0,
                       world_size=1, phase=phase)


def nets(**kw):
    return {"generator": ToyNet(0, **kw), "teacher": ToyNet(1), "aux": ToyNet(2)}


def test_x_init_exact_mask_count_and_real_tokens():
    for r_init in (0.1, 0.6, 1.0):
        g = torch.Generator().manual_seed(0)
        x = dimo_initial_tokens(torch.rand(50, 37, generator=g, dtype=torch.float64),
                                torch.rand(50, 37, generator=g, dtype=torch.float64), r_init=r_init, mask_id=4,
                                vocab_size=9)
        assert ((x == 4).sum(1) == max(1, round(37 * r_init))).all()
        others = x[x != 4]
        if r_init < 1:
            assert others.min() >= 0 and others.max() <= 8
            assert set(others.unique().tolist()) == {0, 1, 2, 3, 5, 6, 7, 8}  # uniform over the real ids


def test_noise_reaches_the_generator_only_and_no_carry_over():
    method = DiMO(DiMOConfig(r_init=0.6, embed_noise=0.3), vocab_size=V, mask_id=MASK)
    n = nets(constant=3)  # a generator that always says "3": nothing of x_init may survive into x_θ
    method.step(n, torch.zeros(4, L, dtype=torch.long), ctx("generator"))
    (gen_call,) = n["generator"].calls
    x_init = gen_call["x"]
    assert ((x_init == MASK).sum(1) == round(0.6 * L)).all()
    scale, noise = gen_call["embed_noise"]
    assert scale == 0.3 and noise.shape == (4, L, D)
    assert noise.std().item() == pytest.approx(0.5, rel=0.3)  # scaled to the embedding RMS (0.5)
    assert gen_call["sigma"][0].item() == pytest.approx(-math.log(0.4), rel=1e-6)
    for other in ("teacher", "aux"):
        (call,) = n[other].calls
        assert "embed_noise" not in call
        xt = call["x"]
        assert ((xt == 3) | (xt == MASK)).all()  # x̃_t = the generator's sample, re-masked: no input token copied
        assert torch.equal(call["rows"], xt == MASK)


@pytest.mark.parametrize("beta", [0.0, 0.5, -0.2])
def test_generator_gradient_is_the_jeffreys_gradient_at_masked_rows(beta):
    method = DiMO(DiMOConfig(beta=beta), vocab_size=V, mask_id=MASK)
    n = nets()
    out = method.step(n, torch.zeros(3, L, dtype=torch.long), ctx("generator", gbs=3))
    out.losses["generator"].backward()
    z = n["generator"].outputs[0]
    masked = n["teacher"].calls[0]["rows"]
    xt = n["teacher"].calls[0]["x"]
    zq = n["aux"].table[xt][masked][:, :MASK].clone().requires_grad_(True)
    zp = n["teacher"].table[xt][masked][:, :MASK]
    log_q, log_p = torch.log_softmax(zq, -1), torch.log_softmax(zp, -1)
    jeffreys = (1 - beta) * (log_p.exp() * (log_p - log_q)).sum() + beta * (log_q.exp() * (log_q - log_p)).sum()
    (g,) = torch.autograd.grad(jeffreys, zq)
    want = torch.zeros_like(z)
    want[masked] = torch.cat([g, torch.zeros(g.shape[0], 1, dtype=g.dtype)], 1) / 3  # /B; 0 on the mask column
    torch.testing.assert_close(z.grad, want, rtol=1e-5, atol=1e-7)
    assert out.losses["generator"].item() == pytest.approx(0.5 * g.square().sum().item() / 3, rel=1e-5)


def _replay_refinement(method, generator_net, c, rows):
    """The draws of `DiMO.generator_input` with refine_frac > 0, replayed on `c`: (x⁰, refined rows, re-masked)."""
    method.initial_tokens(c, rows, L)
    method.embed_noise(c, generator_net, rows, L)
    first = method.sample_generator(generator_net.outputs[0], c)
    refine = torch.rand((c.global_batch_size,), generator=c.generator, dtype=torch.float64) < method.cfg.refine_frac
    ratio = torch.rand((c.global_batch_size,), generator=c.generator, dtype=torch.float64) * method.cfg.r_init
    counts = (ratio * L).round().clamp(1, L).long()
    position_u = torch.rand((c.global_batch_size, L), generator=c.generator, dtype=torch.float64)
    # exactly counts[b] positions: the smallest uniforms of each row (brute force: sort)
    remasked = torch.zeros(c.global_batch_size, L, dtype=torch.bool)
    for b in range(c.global_batch_size):
        remasked[b, position_u[b].argsort()[: counts[b]]] = True
    window = slice(c.global_offset, c.global_offset + rows)
    return first, refine[window], remasked[window], counts[window]


def test_refinement_rows_keep_their_first_draw_and_get_gradient_only_where_redrawn():
    """refine_frac > 0: a refinement row's input is the generator's own draw x⁰ with round(u·r_init·L) positions
    re-masked; its x_θ keeps x⁰ elsewhere, and G's logits get the Jeffreys gradient only at the masked positions of
    x̃_t it redrew (the other rows: x_init and every position, as with refine_frac = 0)."""
    method = DiMO(DiMOConfig(refine_frac=0.5, r_init=0.6), vocab_size=V, mask_id=MASK)
    n, gbs, rows, offset = nets(), 12, 8, 2
    out = method.step(n, torch.zeros(rows, L, dtype=torch.long), ctx("generator", gbs=gbs, offset=offset))
    out.losses["generator"].backward()
    first_call, call = n["generator"].calls
    assert "embed_noise" in first_call and "embed_noise" in call
    assert ((first_call["x"] == MASK).sum(1) == round(0.6 * L)).all()  # x⁰ comes from an ordinary x_init
    first, refine, remasked, counts = _replay_refinement(method, n["generator"], ctx("generator", gbs=gbs,
                                                                                      offset=offset), rows)
    assert 0 < refine.sum() < rows  # both kinds of rows in this draw
    x_in = call["x"]
    assert torch.equal(x_in[~refine], first_call["x"][~refine])  # ordinary rows: that x_init
    assert torch.equal(x_in[refine] == MASK, remasked[refine])
    assert torch.equal((x_in[refine] == MASK).sum(1), counts[refine])
    assert torch.equal(x_in[refine][~remasked[refine]], first[refine][~remasked[refine]])
    redraw = remasked | ~refine[:, None]
    xt, graded = n["teacher"].calls[0]["x"], n["teacher"].calls[0]["rows"]
    assert torch.equal(n["aux"].calls[0]["rows"], graded)
    kept = ~redraw & (xt != MASK)
    assert torch.equal(xt[kept], first[kept])  # a kept position shows x⁰ in x̃_t
    assert torch.equal(graded, (xt == MASK) & redraw)
    assert ((xt == MASK) & ~redraw).any()  # masked in x̃_t but not redrawn: no gradient there
    z = n["generator"].outputs[1]
    zq = n["aux"].table[xt][graded][:, :MASK].clone().requires_grad_(True)
    zp = n["teacher"].table[xt][graded][:, :MASK]
    log_q, log_p = torch.log_softmax(zq, -1), torch.log_softmax(zp, -1)
    (g,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), zq)
    want = torch.zeros_like(z)
    want[graded] = torch.cat([g, torch.zeros(g.shape[0], 1, dtype=g.dtype)], 1) / rows
    torch.testing.assert_close(z.grad, want, rtol=1e-5, atol=1e-7)
    assert n["generator"].outputs[0].grad is None  # no gradient through x⁰


def test_refinement_aux_targets_are_the_merged_sample():
    """The aux model learns the generator's output distribution: with refinement rows, the targets at the masked
    positions of x̃_t are x_θ, x⁰ where the row kept it and the second draw where it redrew."""
    method = DiMO(DiMOConfig(refine_frac=1.0, label_smoothing=0.0), vocab_size=V, mask_id=MASK)
    n, rows = nets(), 4
    out = method.step(n, torch.zeros(rows, L, dtype=torch.long), ctx("aux", gbs=rows))
    c = ctx("aux", gbs=rows)
    first, refine, remasked, _ = _replay_refinement(method, n["generator"], c, rows)
    assert refine.all()
    method.embed_noise(c, n["generator"], rows, L)
    second = method.sample_generator(n["generator"].outputs[1], c)
    x_theta = torch.where(remasked, second, first)
    (aux_call,) = n["aux"].calls
    xt, masked = aux_call["x"], aux_call["rows"]
    assert torch.equal(xt[~masked], x_theta[~masked]) and (~remasked & masked).any()
    log_q = torch.log_softmax(n["aux"].table[xt][masked][:, :MASK], -1)
    want = -log_q.gather(1, x_theta[masked][:, None]).sum() / masked.sum()
    assert out.losses["aux"].item() == pytest.approx(want.item(), rel=1e-6)


def test_aux_loss_is_the_label_smoothed_masked_cross_entropy_over_the_global_batch():
    method = DiMO(DiMOConfig(label_smoothing=0.1), vocab_size=V, mask_id=MASK)
    n = nets()
    gbs, rows, offset = 6, 2, 2
    out = method.step(n, torch.zeros(rows, L, dtype=torch.long), ctx("aux", gbs=gbs, offset=offset))
    (gen_call,) = n["generator"].calls
    (aux_call,) = n["aux"].calls
    assert not n["teacher"].calls and "embed_noise" in gen_call and "embed_noise" not in aux_call
    xt, masked = aux_call["x"], aux_call["rows"]
    # the generator's sample at the masked positions: recompute it from the same draws
    c = ctx("aux", gbs=gbs, offset=offset)
    method.initial_tokens(c, rows, L)
    method.embed_noise(c, n["generator"], rows, L)
    x_gen = method.sample_generator(n["generator"].outputs[0], c)
    assert torch.equal(xt[~masked], x_gen[~masked])
    # global number of masked positions: every rank can compute it from the global draw of the ratios
    full = torch.rand((gbs,), generator=c.generator, dtype=torch.float64)
    counts = (remask_ratio(full, "arccos") * L).round().clamp(1, L)
    assert torch.equal(masked.sum(1).double(), counts[offset : offset + rows])
    log_q = torch.log_softmax(n["aux"].table[xt][masked][:, :MASK], -1)
    y = x_gen[masked]
    ce = 0.9 * -log_q.gather(1, y[:, None]).squeeze(1) + 0.1 * -log_q.mean(1)
    want = ce.sum() / (counts.sum() * rows / gbs)
    assert out.losses["aux"].item() == pytest.approx(want.item(), rel=1e-6)


def test_remask_schedules():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(remask_ratio(u, "arccos"), torch.arccos(u) * 2 / math.pi)
    cos = remask_ratio(u, "cosine")
    assert cos.min() == 0.02 and cos.max() == 0.98
    assert torch.equal(remask_ratio(u, "linear"), u)
    with pytest.raises(ValueError, match="remask schedule"):
        remask_ratio(u, "square")


def test_config_errors():
    with pytest.raises(ValueError, match="r_init"):
        DiMOConfig(r_init=0.0)
    with pytest.raises(ValueError, match="deterministic input"):
        DiMOConfig(r_init=1.0, embed_noise=0.0)
    with pytest.raises(ValueError, match="aux_steps"):
        DiMOConfig(aux_steps=0)
    with pytest.raises(ValueError, match="aux_warmup_steps"):
        DiMOConfig(aux_warmup_steps=-1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="refine_frac"):
            DiMOConfig(refine_frac=bad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generator_draw_fused_kernel_equals_the_torch_path(temperature):
    """x_θ through `draw="fused"` (Triton interpreter here; the "auto" default on CUDA) and `draw="torch"` (float64
    softmax + inverse CDF) on the same global uniforms: the same tokens, never the mask id."""
    logits = torch.randn(4, L, V, generator=torch.Generator().manual_seed(7)) * 3.0
    logits[..., 3] += 4.0  # a dominant real token
    drawn = {}
    for draw in ("torch", "fused"):
        method = DiMO(DiMOConfig(draw=draw, gen_temperature=temperature), vocab_size=V, mask_id=MASK)
        drawn[draw] = method.sample_generator(logits, ctx("generator", gbs=4))
    assert torch.equal(drawn["torch"], drawn["fused"]) and (drawn["fused"] != MASK).all()
    assert 0 < (drawn["fused"] == 3).float().mean() < 1
    with pytest.raises(ValueError, match="method.draw"):
        DiMOConfig(draw="cuda")


def test_generator_metrics_fused_kernel_equal_the_torch_path():
    """gen_max_prob / gen_entropy through `softmax_stats` (draw="fused") and the torch softmax over the real tokens
    (draw="torch"), on logits laid out as the generator's (a column slice of the padded head), the mask column the
    largest logit of some rows."""
    full = torch.randn(4, L, V + 3, generator=torch.Generator().manual_seed(8)) * 3.0
    full[:2, :, MASK] = 20.0
    logits = full[..., :V]
    stats = {draw: DiMO(DiMOConfig(draw=draw), vocab_size=V, mask_id=MASK).generator_stats(logits)
             for draw in ("torch", "fused")}
    p = torch.softmax(logits.double()[..., :MASK], -1)
    for max_prob, entropy in stats.values():
        assert max_prob.item() == pytest.approx(p.max(-1).values.mean().item(), rel=1e-6)
        assert entropy.item() == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-6)


def test_dimo_sampler_one_and_several_steps():
    net = ToyNet(5)

    def draw(steps, **kw):
        return sample_dimo(net, batch_size=5, length=L, num_steps=steps, mask_id=MASK, vocab_size=V, embed_dim=D,
                           generator=torch.Generator().manual_seed(1), device="cpu", **kw)

    one = draw(1)
    assert one.nfe == 1 and (one.tokens != MASK).all()
    assert "embed_noise" in net.calls[0] and ((net.calls[0]["x"] == MASK).sum(1) == round(0.6 * L)).all()
    net.calls.clear()
    four = draw(4)
    assert four.nfe == 4 and (four.tokens != MASK).all() and len(net.calls) == 4
    # step k >= 2 feeds round(r_init·L·(N−k+1)/N) masks: 6 * 3/4, 6 * 2/4, 6 * 1/4
    assert [int((c["x"] == MASK).sum(1).max()) for c in net.calls[1:]] == [round(6 * 3 / 4), 3, round(6 / 4)]
    net.calls.clear()
    squared = draw(4, remask_power=2.0)  # round(6·((N−k+1)/N)²): 3.375, 1.5, 0.375 -> 3, 2, 0 (the last step redraws none)
    assert squared.nfe == 4 and (squared.tokens != MASK).all()
    assert [int((c["x"] == MASK).sum(1).max()) for c in net.calls[1:]] == [3, 2, 0]
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="remask_power"):
            draw(2, remask_power=bad)
    net.calls.clear()
    net.outputs.clear()
    cold = draw(1, temperature=1e-4)  # T → 0: the argmax of the generator's logits (mask id excluded)
    logits = net.outputs[0].detach().clone()
    logits[..., MASK] = float("-inf")
    assert (cold.tokens == logits.argmax(-1)).float().mean() > 0.95
    prefix = torch.full((5, 3), 2)
    assert (draw(3, prefix=prefix).tokens[:, :3] == 2).all()


def test_dimo_sampler_random_remask_is_uniform_over_positions():
    """remask="random" re-masks round(r_init·L·(N−1)/N) positions at step 2 uniformly: each position with probability
    count/L (a 5σ binomial bound); confidence re-masking picks exactly the least confident drawn tokens."""
    net, batch, steps = ToyNet(3), 400, 2
    count = round(0.6 * L * (steps - 1) / steps)

    def second_input(remask):
        net.calls.clear()
        net.outputs.clear()
        sample_dimo(net, batch_size=batch, length=L, num_steps=steps, mask_id=MASK, vocab_size=V, embed_dim=D,
                    generator=torch.Generator().manual_seed(7), device="cpu", remask=remask)
        return net.calls[1]["x"] == MASK, net.outputs[0].detach()

    masked, _ = second_input("random")
    assert (masked.sum(1) == count).all()
    freq, p = masked.double().mean(0), count / L
    assert ((freq - p).abs() <= 5 * math.sqrt(p * (1 - p) / batch)).all()
    masked, first_logits = second_input("confidence")
    # a one-step run with the same seed consumes the same random numbers: its tokens are step 1's draws
    one = sample_dimo(net, batch_size=batch, length=L, num_steps=1, mask_id=MASK, vocab_size=V, embed_dim=D,
                      generator=torch.Generator().manual_seed(7), device="cpu").tokens
    probs = torch.softmax(first_logits.index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
    confidence = probs.gather(-1, one.unsqueeze(-1)).squeeze(-1)
    least = torch.zeros_like(masked).scatter(1, confidence.argsort(1)[:, :count], True)
    assert torch.equal(masked, least)
    with pytest.raises(ValueError, match="remask"):
        sample_dimo(net, batch_size=2, length=L, num_steps=2, mask_id=MASK, vocab_size=V, embed_dim=D,
                    generator=torch.Generator().manual_seed(7), device="cpu", remask="worst")


def test_recipes_load_and_set_per_network_optimizers():
    from ddistill.engine.run_config import load_run_config
    from ddistill.methods.dimo import DiMO

    owt = load_run_config("configs/experiments/dimo_owt_small.yaml", ["networks.aux.optim.lr=2e-5"])
    tiny = load_run_config("configs/experiments/dimo_classics_tiny.yaml", ["init_from=somewhere"])
    for cfg in (owt, tiny):
        assert cfg.method.name == "dimo" and cfg.method.config.r_init == 0.6
        specs = DiMO(cfg.method.config, vocab_size=cfg.model.vocab_size, mask_id=cfg.model.vocab_size - 1).networks()
        gen, aux = cfg.network_optim("generator", specs["generator"].optim), cfg.network_optim("aux", specs["aux"].optim)
        assert gen.algorithm == aux.algorithm == "adam" and gen.grad_clip == 1.0 and aux.grad_clip == 0.0
    assert owt.network_optim("aux", {}).lr == 2e-5 and owt.network_optim("generator", specs["generator"].optim).eps == 1e-6
    assert tiny.network_optim("aux", specs["aux"].optim).lr == 3e-4 and tiny.method.config.refine_frac == 0.5
    assert owt.method.config.refine_frac == 0.0  # the released update: no evidence at OWT scale yet
