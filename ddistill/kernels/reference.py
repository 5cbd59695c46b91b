"""Pure-torch references of the fused losses (same signatures as the Triton paths, selected with ``impl="torch"``).

Each reference materialises ``logits = hidden @ W[:V].T + b[:V]`` in the input dtype, upcasts to fp32 (what the
reference MDLM/DUO code does under bf16 autocast) and applies the per-token math of ``ddistill.diffusion``
(``absorbing.mdlm_loss_per_token``, ``uniform.duo_elbo_per_token``); the divergences are written out here.

``mdlm_nll_rows`` and ``duo_elbo_rows`` restate the MDLM (arXiv:2406.07524, SUBS) and DUO (arXiv:2506.10892,
``DUO_BASE.nll_per_token``) per-token math in whatever dtype they are given: ``ddistill.diffusion`` computes in
fp32, so these are the float64 oracles of the tests, which also check them against ``ddistill.diffusion``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddistill.diffusion.absorbing import mdlm_loss_per_token
from ddistill.diffusion.uniform import duo_elbo_per_token

DIVERGENCES = ("kl_fwd", "kl_rev", "jsd", "tvd")


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """fp32 (or fp64) logits over the real vocabulary: ``(hidden @ weight[:V].T + bias[:V]).float()``."""
    weight = weight[:vocab_size].to(hidden.dtype)
    bias = None if bias is None else bias[:vocab_size].to(hidden.dtype)
    logits = F.linear(hidden, weight, bias)
    return logits if logits.dtype == torch.float64 else logits.float()


def _rows(value, num_rows: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(num_rows) if t.dim() == 0 else t.to(like.dtype)


def _normalise(total: torch.Tensor, normalizer) -> torch.Tensor:
    if isinstance(normalizer, torch.Tensor):
        return total / normalizer.to(device=total.device, dtype=total.dtype)
    return total / normalizer


def _drop_column(logits: torch.Tensor, column: int | None) -> torch.Tensor:
    if column is None or column >= logits.shape[-1]:
        return logits
    keep = torch.arange(logits.shape[-1], device=logits.device) != column
    return logits[:, keep]


# ----------------------------------------------------------------------------------------------------------------
# MDLM (SUBS)


def mdlm_nll_rows(logits: torch.Tensor, x0: torch.Tensor, is_masked: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    """−log p_SUBS(x0 | x_t) per row: mask logit → −1e6 then log-softmax; 0 on unmasked (carry-over) rows."""
    if mask_id is not None and mask_id < logits.shape[-1]:
        neg = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        neg[mask_id] = -1.0e6
        logits = logits + neg
    log_p = torch.log_softmax(logits, dim=-1)
    nll = -log_p.gather(-1, x0.long().unsqueeze(-1)).squeeze(-1)
    return torch.where(is_masked, nll, torch.zeros_like(nll))


def masked_diffusion_loss_reference(
    hidden, weight, bias, targets, row_weight, vocab_size, mask_id, *, is_masked=None, normalizer=1.0,
    label_smoothing=0.0,
) -> torch.Tensor:  # fmt: skip
    """Rows are tokens with α = 0, α' = −w, so ``mdlm_loss_per_token`` = w·(−log p_SUBS(x0)) at masked rows; with
    ``label_smoothing`` ε > 0, ``F.cross_entropy(label_smoothing=ε)`` over the real columns but the mask, times w."""
    logits = linear_logits(hidden, weight, bias, vocab_size)
    num_rows = logits.shape[0]
    if is_masked is None:
        is_masked = torch.ones(num_rows, dtype=torch.bool, device=hidden.device)
    w = _rows(row_weight, num_rows, logits)
    if label_smoothing > 0.0:
        column = None if mask_id is None or mask_id >= vocab_size else mask_id
        kept = _drop_column(logits[is_masked], column)
        y = targets[is_masked].long()
        y = y - (y > column).long() if column is not None else y  # the target's index among the kept columns
        rows = F.cross_entropy(kept, y, reduction="none", label_smoothing=label_smoothing) * w[is_masked]
        return _normalise(rows.sum(), normalizer)
    if mask_id is None or mask_id >= vocab_size:  # no mask column among the real ones: plain weighted CE
        rows = mdlm_nll_rows(logits, targets, is_masked, None) * w
    else:
        xt = torch.where(is_masked, torch.full_like(targets, mask_id), targets)
        rows = mdlm_loss_per_token(logits, targets, xt, torch.zeros_like(w), -w, mask_id)
    return _normalise(rows.sum(), normalizer)


def masked_diffusion_loss_oracle(
    hidden, weight, bias, targets, row_weight, vocab_size, mask_id, *, is_masked=None, normalizer=1.0
) -> torch.Tensor:
    """Same as :func:`masked_diffusion_loss_reference` with the dtype-preserving math (float64 oracle)."""
    logits = linear_logits(hidden, weight, bias, vocab_size)
    if is_masked is None:
        is_masked = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    rows = mdlm_nll_rows(logits, targets, is_masked, mask_id)
    return _normalise((rows * _rows(row_weight, rows.shape[0], rows)).sum(), normalizer)


# ----------------------------------------------------------------------------------------------------------------
# Distillation divergences


def divergence_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between q = softmax(student) and p = softmax(teacher)."""
    log_q = torch.log_softmax(student_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if kind == "kl_fwd":
        return (p * (log_p - log_q)).sum(-1)
    if kind == "kl_rev":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
        return beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
    if kind == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    raise ValueError(f"kind={kind!r}: expected one of {DIVERGENCES}")


def distill_loss_reference(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, row_weight, vocab_size,
    *, kind="kl_rev", beta=0.5, temperature=1.0, mask_id=None, row_mask=None, normalizer=1.0,
) -> torch.Tensor:  # fmt: skip
    s = linear_logits(student_hidden, student_weight, student_bias, vocab_size) / temperature
    with torch.no_grad():
        t = linear_logits(teacher_hidden, teacher_weight, teacher_bias, vocab_size) / temperature
    rows = divergence_rows(_drop_column(s, mask_id), _drop_column(t, mask_id), kind, beta)
    w = _rows(row_weight, rows.shape[0], rows)
    if row_mask is not None:
        rows = torch.where(row_mask, rows, torch.zeros_like(rows))
    return _normalise((rows * w).sum(), normalizer)


def dimo_generator_loss_reference(
    gen_hidden, gen_weight, gen_bias, aux_hidden, aux_weight, aux_bias, teacher_hidden, teacher_weight, teacher_bias,
    row_weight, vocab_size, *, beta=0.0, mask_id=None, row_mask=None, normalizer=1.0,
) -> torch.Tensor:  # fmt: skip
    """DiMO's generator surrogate 0.5‖z − sg(z − g)‖² with g = (1 − β)(q − p) + β q ⊙ (log q − log p − KL(q‖p)),
    q = p_aux, p = p_teacher (arXiv:2503.15457)."""
    z = linear_logits(gen_hidden, gen_weight, gen_bias, vocab_size)
    with torch.no_grad():
        za = _drop_column(linear_logits(aux_hidden, aux_weight, aux_bias, vocab_size), mask_id)
        zt = _drop_column(linear_logits(teacher_hidden, teacher_weight, teacher_bias, vocab_size), mask_id)
        log_q, log_p = torch.log_softmax(za, dim=-1), torch.log_softmax(zt, dim=-1)
        q, a = log_q.exp(), log_q - log_p
        g_kept = (1.0 - beta) * (q - log_p.exp()) + beta * q * (a - (q * a).sum(-1, keepdim=True))
        g = torch.zeros_like(z)
        if mask_id is None or mask_id >= vocab_size:
            g = g_kept
        else:
            g[:, torch.arange(vocab_size, device=z.device) != mask_id] = g_kept
    rows = 0.5 * (z - (z.detach() - g)).pow(2).sum(-1)
    w = _rows(row_weight, rows.shape[0], rows)
    if row_mask is not None:
        rows = torch.where(row_mask, rows, torch.zeros_like(rows))
    return _normalise((rows * w).sum(), normalizer)


# ----------------------------------------------------------------------------------------------------------------
# Uniform-state (DUO / UDLM) ELBO


def duo_elbo_rows(logits: torch.Tensor, xt: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, alpha_prime_t: torch.Tensor) -> torch.Tensor:
    """DUO's closed-form per-token NELBO (``DUO_BASE.nll_per_token``); K = logits.shape[-1], α, α' per row.

    x̄θ = Kα·p + (1−α), x̄_i = (1−α) + Kα[x0 = xt], κ = (1−α)/(Kα + 1 − α), i = xt, m = x0:
    term1 = K(1/x̄_i − 1/x̄θ_i);
    term2 = −(κ[x0=xt] + [x0≠xt])(Σ_j log x̄θ_j − K log x̄θ_i) − Kα/(1−α)(log x̄θ_m − log x̄θ_i)[x0≠xt]
            + ((K−1)κ[x0=xt] − [x0≠xt]/κ) log κ;
    loss = α'/(Kα) · (term1 − term2).
    """
    num_classes = logits.shape[-1]
    alpha = alpha_t.to(logits.dtype)
    dalpha = alpha_prime_t.to(logits.dtype)
    log_p = torch.log_softmax(logits, dim=-1)
    scale = (num_classes * alpha).unsqueeze(-1)
    log_xbar = torch.log(scale * log_p.exp() + (1.0 - alpha).unsqueeze(-1))
    log_xbar_i = log_xbar.gather(-1, xt.long().unsqueeze(-1)).squeeze(-1)
    log_xbar_m = log_xbar.gather(-1, x0.long().unsqueeze(-1)).squeeze(-1)
    same = (x0 == xt).to(logits.dtype)
    diff = 1.0 - same
    xbar_i = (1.0 - alpha) + num_classes * alpha * same
    term1 = num_classes * (1.0 / xbar_i - torch.exp(-log_xbar_i))
    kappa = (1.0 - alpha) / (num_classes * alpha + 1.0 - alpha)
    sum_log = (log_xbar - log_xbar_i.unsqueeze(-1)).sum(-1)
    term2 = (
        -(kappa * same + diff) * sum_log
        - num_classes * alpha / (1.0 - alpha) * (log_xbar_m - log_xbar_i) * diff
        + ((num_classes - 1) * kappa * same - diff / kappa) * torch.log(kappa)
    )
    return dalpha / (num_classes * alpha) * (term1 - term2)


def udlm_elbo_rows_bruteforce(logits, xt, x0, alpha_t, alpha_prime_t) -> torch.Tensor:
    """UDLM's per-token form with a dense one-hot x̄ (N × K): coeff·(term1 − Σ_j x̄_j/x̄_i · log(x̄θ_i x̄_j / (x̄θ_j x̄_i)))."""
    num_classes = logits.shape[-1]
    alpha = alpha_t.to(logits.dtype).unsqueeze(-1)
    p = torch.softmax(logits, dim=-1)
    xbar_theta = num_classes * alpha * p + (1.0 - alpha)
    xbar = num_classes * alpha * F.one_hot(x0.long(), num_classes).to(logits.dtype) + (1.0 - alpha)
    idx = xt.long().unsqueeze(-1)
    xbar_i = xbar.gather(-1, idx)
    xbar_theta_i = xbar_theta.gather(-1, idx)
    term1 = num_classes * (1.0 / xbar_i - 1.0 / xbar_theta_i)
    term2 = (xbar / xbar_i * torch.log(xbar_theta_i * xbar / (xbar_theta * xbar_i))).sum(-1, keepdim=True)
    coeff = alpha_prime_t.to(logits.dtype).unsqueeze(-1) / (num_classes * alpha)
    return (coeff * (term1 - term2)).squeeze(-1)


def uniform_elbo_loss_reference(
    hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, *, row_weight=1.0, normalizer=1.0
) -> torch.Tensor:
    logits = linear_logits(hidden, weight, bias, vocab_size)
    num_rows = logits.shape[0]
    alpha, dalpha = _rows(alpha_t, num_rows, logits), _rows(alpha_prime_t, num_rows, logits)
    rows = duo_elbo_per_token(logits, xt.long(), x0.long(), alpha, dalpha)
    return _normalise((rows * _rows(row_weight, num_rows, rows)).sum(), normalizer)


def uniform_elbo_loss_oracle(
    hidden, weight, bias, xt, x0, alpha_t, alpha_prime_t, vocab_size, *, row_weight=1.0, normalizer=1.0
) -> torch.Tensor:
    """Same as :func:`uniform_elbo_loss_reference` with the dtype-preserving math (float64 oracle)."""
    logits = linear_logits(hidden, weight, bias, vocab_size)
    num_rows = logits.shape[0]
    rows = duo_elbo_rows(logits, xt, x0, _rows(alpha_t, num_rows, logits), _rows(alpha_prime_t, num_rows, logits))
    return _normalise((rows * _rows(row_weight, num_rows, rows)).sum(), normalizer)
