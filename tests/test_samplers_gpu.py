"""On CUDA: the fused sampling draws (ddistill.kernels.sampling) against the float64 torch path at the real vocabulary
(V = 50258, bf16 logits as a slice of the padded head), and the samplers with draw="fused" against draw="torch"."""

import pytest
import torch

from ddistill.diffusion import LogLinearSchedule, sample_duo, sample_mdlm
from ddistill.diffusion.samplers import sample_categorical
from ddistill.diffusion.uniform import uniform_posterior
from ddistill.kernels.sampling import draw_categorical, draw_uniform_posterior, masked_argmax, softmax_stats
from ddistill.models import ModelConfig, build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

V, V_PAD, ROWS = 50258, 50304, 4096


def _logits(seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    full = torch.randn(ROWS, V_PAD, generator=g, device="cuda") * scale
    return full.to(torch.bfloat16)[:, :V]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_draw_categorical_equals_torch_at_real_shapes(scale):
    logits = _logits(0, scale)
    g = torch.Generator(device="cuda").manual_seed(1)
    u = torch.rand(ROWS, generator=g, device="cuda", dtype=torch.float64)
    tokens = draw_categorical(logits, u, exclude=V - 1)
    probs = torch.softmax(logits.double().index_fill(-1, torch.tensor([V - 1], device="cuda"), float("-inf")), -1)
    expected = sample_categorical(probs, u)
    assert int((tokens != expected).sum()) == 0


@pytest.mark.parametrize(("alpha_t", "alpha_s"), [(0.05, 0.1), (0.6, 0.7), (0.99, 1.0)])
def test_draw_uniform_posterior_equals_torch_at_real_shapes(alpha_t, alpha_s):
    logits = _logits(2, 3.0)
    g = torch.Generator(device="cuda").manual_seed(3)
    zt = torch.randint(0, V, (ROWS,), generator=g, device="cuda")
    u = torch.rand(ROWS, generator=g, device="cuda", dtype=torch.float64)
    a_t = torch.tensor(alpha_t, dtype=torch.float64, device="cuda")
    a_s = torch.tensor(alpha_s, dtype=torch.float64, device="cuda")
    tokens = draw_uniform_posterior(logits, zt, u, a_t, a_s)
    expected = sample_categorical(uniform_posterior(torch.softmax(logits.double(), -1), zt, a_t, a_s), u)
    assert int((tokens != expected).sum()) == 0


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_softmax_stats_equal_float64_at_real_shapes(scale):
    """DiMO's generator metrics: max-probability and entropy of bf16 logits (a slice of the padded head), the mask
    column excluded, against the float64 softmax."""
    logits = _logits(4, scale)
    max_prob, entropy = softmax_stats(logits, exclude=V - 1)
    p = torch.softmax(logits.double().index_fill(-1, torch.tensor([V - 1], device="cuda"), float("-inf")), -1)
    torch.testing.assert_close(max_prob.double(), p.max(-1).values, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(entropy.double(), -(p * p.clamp_min(1e-300).log()).sum(-1), rtol=1e-5, atol=1e-5)


def test_masked_argmax_equals_torch_at_real_shapes():
    logits = _logits(4, 2.0)  # bf16: many ties among 50k values; the first maximum wins on both paths
    col = torch.tensor([V - 1], device="cuda")
    expected = torch.softmax(logits.double().index_fill(-1, col, float("-inf")), -1).argmax(-1)
    assert torch.equal(masked_argmax(logits, exclude=V - 1), expected)
    assert torch.equal(masked_argmax(logits), torch.softmax(logits.double(), -1).argmax(-1))


def _model(time_conditioning: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=V, length=128, time_conditioning=time_conditioning,
                                    dropout=0.0)).cuda().eval()
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dim() >= 2 and prm.abs().sum() == 0:
                prm.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("num_steps", [4, 32])
def test_samplers_fused_equal_torch_on_gpu(num_steps):
    mdlm = dict(batch_size=4, length=128, num_steps=num_steps, mask_id=V - 1, vocab_size=V,
                schedule=LogLinearSchedule(), cached=True, device="cuda")
    model = _model(False)
    fused = sample_mdlm(model, generator=torch.Generator(device="cuda").manual_seed(5), draw="fused", row_logits=True,
                        **mdlm)
    ref = sample_mdlm(model, generator=torch.Generator(device="cuda").manual_seed(5), draw="torch", **mdlm)
    assert torch.equal(fused.tokens, ref.tokens) and fused.nfe == ref.nfe
    duo = dict(batch_size=4, length=128, num_steps=num_steps, vocab_size=V, schedule=LogLinearSchedule(),
               device="cuda")
    model = _model(True)
    for greedy_tail in (False, True):
        fused = sample_duo(model, generator=torch.Generator(device="cuda").manual_seed(6), draw="fused",
                           greedy_tail=greedy_tail, **duo)
        ref = sample_duo(model, generator=torch.Generator(device="cuda").manual_seed(6), draw="torch",
                         greedy_tail=greedy_tail, **duo)
        assert torch.equal(fused.tokens, ref.tokens)
