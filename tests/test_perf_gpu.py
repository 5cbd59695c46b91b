"""On CUDA: the regional torch.compile of the DiT blocks (train.compile) against the eager blocks, forward and
backward under the default bf16 autocast, and the MDLM sampler's tokens against the plain float64 transcription."""

import copy

import pytest
import torch

from test_samplers import _mdlm_reference as mdlm_reference

from ddistill.diffusion import LogLinearSchedule, sample_mdlm
from ddistill.models import ModelConfig, build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

V = 101


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_compiled_blocks_match_eager_forward_and_backward():
    torch.manual_seed(0)
    eager = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.0, n_blocks=3)).cuda()
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0.0, 0.1)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints keep their keys
    for trial in range(2):  # fresh inputs each time: the compiled graph must compute the same function
        x = torch.randint(0, V, (3, 37), device="cuda")
        sigma = torch.rand(3, device="cuda")
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            logits = model(x, sigma)
            (logits.float().square().mean()).backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            outs.append((logits.float().detach(), grads))
        (le, ge), (lc, gc) = outs
        assert _rel(lc, le) < 2e-2, trial  # bf16 operands: 1e-3..1e-2
        assert set(gc) == set(ge)
        for name in ge:
            if ge[name].norm() > 0:
                assert _rel(gc[name], ge[name]) < 5e-2, (trial, name)


def _context_denoiser(x, sigma):
    n_unmasked = (x != V - 1).sum(-1, keepdim=True).float()
    logits = torch.zeros(*x.shape, V, device=x.device)
    logits[..., : V - 1] = torch.linspace(-2, 2, V - 1, device=x.device) * (1 + 0.1 * n_unmasked[..., None])
    logits[..., : V - 1] += (x[..., :1] % 7).float()[..., None] * 0.3
    return logits


@pytest.mark.parametrize("num_steps", [1, 8, 64])
def test_mdlm_sampler_on_gpu_equals_plain_transcription(num_steps):
    """float64 softmax on the drawn rows only (samplers.sample_mdlm) = the per-position float64 posterior, token for
    token, with the same CUDA random numbers."""
    kw = dict(batch_size=4, length=33, num_steps=num_steps)
    fast = sample_mdlm(_context_denoiser, mask_id=V - 1, vocab_size=V, schedule=LogLinearSchedule(), cached=False,
                       device="cuda", generator=torch.Generator(device="cuda").manual_seed(3), **kw)
    plain = mdlm_reference(_context_denoiser, mask_id=V - 1, device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(3), **kw)
    assert (fast.tokens != V - 1).all()
    assert torch.equal(fast.tokens, plain)


def test_lagged_any_rank_reads_the_previous_calls_flag_through_pinned_memory(monkeypatch):
    """LaggedAnyRank's CUDA path (pinned host buffers behind events) on one GPU, with the all-reduce of a
    several-rank group stood in by the identity: each call answers the previous call's value, never the queue's.
    A long matmul queued before each call makes a read that waited on the whole queue (not the event) slow but not
    wrong, so the test checks values; tests/test_engine_dist.py checks the agreement across two gloo ranks."""
    from ddistill.engine import distributed

    monkeypatch.setattr(distributed, "_multi_rank", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda tensor, op=None: tensor)
    agree = distributed.LaggedAnyRank(torch.device("cuda"))
    big = torch.randn(4096, 4096, device="cuda")
    seen = []
    for value in (False, True, False, True, True, False):
        big = big @ big / 64.0
        seen.append(agree(value))
    assert seen == [False, False, True, False, True, True]
    assert all(buffer.is_pinned() for buffer in agree._host)
