"""Absorbing-state (masked) diffusion: forward masking, SUBS parameterisation and the MDLM loss (arXiv 2406.07524).

Forward process: each token of x0 independently becomes [MASK] with probability 1 − α_t.

SUBS parameterisation of the denoiser x_θ(x_t) ∈ Δ^V: the [MASK] logit is set to −∞ (zero mass on [MASK]) and a
log-softmax is taken; positions that are unmasked in x_t carry their token over (log-prob 0 there, −∞ elsewhere).

Continuous-time NELBO per token (MDLM eq. 10 / DUO arXiv 2506.10892 §3.2):

    ℓ = (α'_t / (1 − α_t)) · log p_θ(x0 | x_t) · 1[x_t = MASK]      (≥ 0 since α' < 0; = −log p / t for log-linear)

where log p_θ(x0) = logit[x0] − logsumexp_{v ≠ MASK} logit[v]. Unmasked positions contribute 0 (carry-over). The loss
is computed in fp32 from logits of any dtype, from one fp32 copy of the logits (a per-row logsumexp, evaluated in row
chunks so its exp() workspace stays small, and a gather).
"""

from __future__ import annotations

import torch

__all__ = ["exact_count_mask", "mask_tokens", "subs_log_probs", "masked_target_log_prob", "mdlm_loss_per_token", "mdlm_loss", "row_logsumexp"]


def per_token(a: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sequence (B,) or per-token (like.shape) coefficient against a token tensor `like`."""
    a = torch.as_tensor(a, device=like.device)
    if a.dim() == 0 or a.shape == like.shape:
        return a
    if a.dim() == 1 and a.shape[0] == like.shape[0]:
        return a.reshape(a.shape[0], *([1] * (like.dim() - 1)))
    raise ValueError(f"coefficient of shape {tuple(a.shape)} does not match tokens of shape {tuple(like.shape)}")


def mask_tokens(x0: torch.Tensor, alpha_t: torch.Tensor, mask_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """x_t: each token of x0 (B,L) replaced by `mask_id` with probability 1 − α_t (α_t of shape (B,) or (B,L))."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
    masked = u < (1.0 - per_token(alpha_t, x0).to(torch.float64))
    return torch.where(masked, torch.full_like(x0, mask_id), x0)


def exact_count_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: in row b, the counts[b] positions of smallest `scores` (i.i.d. uniforms give exactly counts[b]
    positions chosen uniformly at random, as DiMO's random-permutation masking, arXiv 2503.15457)."""
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    return rank < counts.to(rank.device).reshape(-1, 1)


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS log-probabilities (…, V) in fp32: zero mass on [MASK], carry-over for unmasked positions of xt."""
    lp = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    lp = torch.log_softmax(lp, dim=-1)
    carry = xt != mask_id
    lp = lp.masked_fill(carry.unsqueeze(-1), float("-inf"))
    # At masked rows xt == mask_id, whose column is already −inf, so writing −inf there is a no-op.
    zero_or_ninf = torch.zeros_like(xt, dtype=lp.dtype).masked_fill(~carry, float("-inf"))
    return lp.scatter(-1, xt.unsqueeze(-1), zero_or_ninf.unsqueeze(-1))


ROW_CHUNK = 2048  # rows per logsumexp call: bounds the exp() workspace to ROW_CHUNK × V floats


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, computed ROW_CHUNK rows at a time (shape x.shape[:-1])."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([torch.logsumexp(c, dim=-1) for c in flat.split(ROW_CHUNK)]).reshape(x.shape[:-1])


def masked_target_log_prob(logits: torch.Tensor, target: torch.Tensor, mask_id: int) -> torch.Tensor:
    """log softmax_{v≠mask}(logits)[target] in fp32, shape = target.shape, via logsumexp over the non-mask columns."""
    V = logits.shape[-1]
    assert 0 <= mask_id < V and V > 1, "mask_id must index a column of a vocabulary with at least one other id"
    lf = logits.float()
    # Logsumexp over the columns on either side of the mask column (views, no copy with the mask removed).
    lses = [row_logsumexp(p) for p in (lf[..., :mask_id], lf[..., mask_id + 1 :]) if p.shape[-1] > 0]
    lse = lses[0] if len(lses) == 1 else torch.logaddexp(lses[0], lses[1])
    return lf.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse


def mdlm_loss_per_token(
    logits: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prime_t: torch.Tensor,
    mask_id: int,
) -> torch.Tensor:
    """Per-token MDLM NELBO (fp32, shape of x0): α'/(1−α)·log p_θ(x0|x_t) at masked positions of xt, 0 elsewhere.

    α_t, α'_t: shape (B,) (per sequence) or x0.shape (per token).
    """
    log_p = masked_target_log_prob(logits, x0, mask_id)
    alpha = per_token(alpha_t, x0).float()
    weight = per_token(alpha_prime_t, x0).float() / (1.0 - alpha)
    loss = weight * log_p
    return torch.where(xt == mask_id, loss, torch.zeros_like(loss))


def mdlm_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prime_t: torch.Tensor,
    mask_id: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar MDLM loss: Σ per-token loss over valid tokens / number of valid tokens (all tokens when valid=None)."""
    per_tok = mdlm_loss_per_token(logits, x0, xt, alpha_t, alpha_prime_t, mask_id)
    if valid is None:
        return per_tok.sum() / per_tok.numel()
    valid = valid.to(torch.bool)
    return torch.where(valid, per_tok, torch.zeros_like(per_tok)).sum() / valid.sum().clamp_min(1)
