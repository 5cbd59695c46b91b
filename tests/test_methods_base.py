"""Method registry contract and the base-training methods (mdlm, usdm) against independent float64 references."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from ddistill.methods import available_methods, get_method, register
from ddistill.methods.base import Method, NetworkSpec, StepContext, global_randint, global_uniform

V, L = 11, 6  # tiny vocabulary (mask = V - 1) and length


class ToyNet:
    """A deterministic 'network': logits = table[x] + sigma-dependent shift, in float64."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=gen, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, sigma, rows=None):
        self.calls.append((x.clone(), sigma.clone()))
        logits = self.table[x] + 0.1 * sigma[:, None, None]
        return logits if rows is None else logits[rows]


def ctx(step=0, micro=0, offset=0, gbs=8, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return StepContext(step=step, micro_step=micro, global_offset=offset, global_batch_size=gbs, generator=gen,
                       device=torch.device("cpu"), rank=0, world_size=1)


def test_registry_lists_and_rejects():
    assert {"mdlm", "usdm"} <= set(available_methods())
    with pytest.raises(ValueError, match="available methods: .*mdlm"):
        get_method("no-such-method")

    @dataclass(kw_only=True)
    class Cfg:
        pass

    class Dup(Method):
        name = "mdlm"
        Config = Cfg

        def networks(self):
            return {}

        def step(self, nets, batch, ctx):
            raise NotImplementedError

    with pytest.raises(ValueError, match="already registered"):
        register(Dup)


def test_network_spec_validation():
    with pytest.raises(ValueError, match="role"):
        NetworkSpec(role="teacher")
    with pytest.raises(ValueError, match="init"):
        NetworkSpec(role="frozen", init="random")
    with pytest.raises(ValueError, match="ema"):
        NetworkSpec(role="frozen", ema=True)
    assert NetworkSpec(role="frozen", init="copy:student").init == "copy:student"


def test_global_draws_are_slices_of_one_global_draw():
    whole = global_uniform(ctx(offset=0, gbs=8), 8, (L,))
    parts = torch.cat([global_uniform(ctx(offset=o, gbs=8), 2, (L,)) for o in range(0, 8, 2)])
    assert torch.equal(whole, parts)
    ids = global_randint(ctx(offset=4, gbs=8), V, 4, (L,))
    assert torch.equal(ids, global_randint(ctx(offset=0, gbs=8), V, 8, (L,))[4:])


def _mdlm_reference(net, x0, xt, t, eps=1e-3):
    """float64 brute force of Σ_masked (α'/(1-α)) log p_SUBS(x0) / numel with α = 1 - (1-eps) t."""
    alpha = 1 - (1 - eps) * t.double()
    alpha_prime = -(1 - eps) * torch.ones_like(alpha)
    sigma = -torch.log(alpha)
    logits = net.table[xt] + 0.1 * sigma[:, None, None]
    logits[..., V - 1] = -math.inf
    logp = torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    w = (alpha_prime / (1 - alpha))[:, None]
    return torch.where(xt == V - 1, w * logp, torch.zeros_like(logp)).sum() / x0.numel()


@pytest.mark.parametrize("name", ["mdlm", "usdm"])
def test_step_does_not_depend_on_the_split_of_the_global_batch(name):
    cls = get_method(name)
    method = cls(cls.Config(), vocab_size=V, mask_id=V - 1)
    x0 = torch.randint(0, V - 1, (8, L), generator=torch.Generator().manual_seed(1))
    net = ToyNet()
    whole = method.step({"student": net}, x0, ctx(offset=0, gbs=8))
    xt_whole, sigma_whole = net.calls[-1]
    halves = [method.step({"student": net}, x0[o:o + 4], ctx(offset=o, gbs=8)) for o in (0, 4)]
    xt_halves = torch.cat([c[0] for c in net.calls[-2:]])
    sigma_halves = torch.cat([c[1] for c in net.calls[-2:]])
    assert torch.equal(xt_whole, xt_halves)
    assert torch.equal(sigma_whole, sigma_halves)
    mean_of_halves = sum(h.losses["student"] for h in halves) / 2
    torch.testing.assert_close(whole.losses["student"], mean_of_halves, rtol=1e-6, atol=1e-7)


def test_mdlm_loss_matches_float64_reference_and_corrupts_correctly():
    cls = get_method("mdlm")
    method = cls(cls.Config(), vocab_size=V, mask_id=V - 1)
    assert method.networks()["student"].model_overrides == {"time_conditioning": False}
    assert method.networks()["student"].ema
    x0 = torch.randint(0, V - 1, (8, L), generator=torch.Generator().manual_seed(2))
    net = ToyNet()
    out = method.step({"student": net}, x0, ctx())
    xt, sigma = net.calls[-1]
    assert ((xt == x0) | (xt == V - 1)).all() and (xt == V - 1).any()
    # Recover t from σ = -log(1 - (1-eps) t) and recompute the loss independently in float64.
    t = (1 - torch.exp(-sigma.double())) / (1 - 1e-3)
    ref = _mdlm_reference(net, x0, xt, t)
    assert out.num_tokens == x0.numel()
    torch.testing.assert_close(out.losses["student"].double(), ref, rtol=2e-5, atol=1e-6)
    # Antithetic times: the 8 times occupy the 8 strata of [t_min, 1].
    u = (t - 1e-3) / (1 - 1e-3)
    assert sorted(torch.floor(u * 8).long().tolist()) == list(range(8))


def _duo_reference(logits, xt, x0, alpha, alpha_prime):
    """UDLM's per-token loss written with the one-hot x̄ materialised (float64), DUO arXiv 2506.10892 eq. 17."""
    K = logits.shape[-1]
    p = torch.softmax(logits.double(), -1)
    a = alpha[:, None, None]
    xbar_theta = K * a * p + (1 - a)
    xbar = K * a * torch.nn.functional.one_hot(x0, K).double() + (1 - a)
    i = xt[..., None]
    xbar_i, xbar_theta_i = xbar.gather(-1, i), xbar_theta.gather(-1, i)
    inner = (xbar / xbar_i * torch.log(xbar_theta_i * xbar / (xbar_theta * xbar_i))).sum(-1)
    term1 = K * (1 / xbar_i[..., 0] - 1 / xbar_theta_i[..., 0])
    return (alpha_prime / (K * alpha))[:, None] * (term1 - inner)


def test_usdm_loss_matches_bruteforce_elbo():
    cls = get_method("usdm")
    method = cls(cls.Config(), vocab_size=V, mask_id=V - 1)
    assert method.networks()["student"].model_overrides == {"time_conditioning": True}
    x0 = torch.randint(0, V, (8, L), generator=torch.Generator().manual_seed(3))
    net = ToyNet()
    out = method.step({"student": net}, x0, ctx())
    xt, sigma = net.calls[-1]
    assert (xt != x0).any() and (xt == x0).any()
    alpha = torch.exp(-sigma.double())
    alpha_prime = -(1 - 1e-3) * torch.ones_like(alpha)
    ref = _duo_reference(net(xt, sigma), xt, x0, alpha, alpha_prime).sum() / x0.numel()
    torch.testing.assert_close(out.losses["student"].double(), ref, rtol=1e-4, atol=1e-6)


def test_triton_switch_without_kernel_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("ddistill.kernels"):
            raise ImportError("kernels not built")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    cls = get_method("mdlm")
    with pytest.raises(ValueError, match="loss_impl=torch"):
        cls(cls.Config(loss_impl="triton"), vocab_size=V, mask_id=V - 1)


@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("name", ["mdlm", "usdm"])
def test_triton_loss_equals_torch_loss_and_gradients(name, impl):
    from ddistill.models.dit import build_model

    torch.manual_seed(0)
    net = build_model({"size": "test", "vocab_size": V, "dropout": 0.0})
    with torch.no_grad():  # the output layer is zero-initialised; give it something to differentiate
        for p in net.output_layer.parameters():
            p.normal_(0, 0.5)
    cls = get_method(name)
    x0 = torch.randint(0, V - 1, (8, L), generator=torch.Generator().manual_seed(4))
    results = []
    for loss_impl in ("torch", impl):
        net.zero_grad()
        method = cls(cls.Config(loss_impl=loss_impl), vocab_size=V, mask_id=V - 1)
        loss = method.step({"student": net}, x0, ctx()).losses["student"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (loss_t, grads_t), (loss_k, grads_k) = results
    assert loss_t > 0
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-4, atol=1e-6)
    for g_k, g_t in zip(grads_k, grads_t):
        torch.testing.assert_close(g_k, g_t, rtol=1e-3, atol=1e-5)
