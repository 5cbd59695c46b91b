"""Ancestral samplers for masked (MDLM, arXiv 2406.07524) and uniform-state (DUO, arXiv 2506.10892) diffusion.

Both run on the time grid t_k = linspace(1, t_end, T+1) of a noise schedule, call the denoiser with
σ_t = −log α_t, and sample in float64 (the low-precision Gumbel artefact of Zheng et al., arXiv 2409.02908).
Nucleus (top-p) filtering is applied to the denoiser probabilities x_θ (not to the posterior), then renormalised.

MDLM step t → s (per masked position; unmasked positions are copied):
    q(z_s) = (α_s − α_t)/(1 − α_t) · x_θ(z_t) + (1 − α_s)/(1 − α_t) · e_MASK,
sampled as "unmask with probability (α_s − α_t)/(1 − α_t), then draw the token from x_θ"; x_θ is the SUBS output, so
its [MASK] column is 0. After the last step the remaining masks are filled from x_θ(z, t_end) (a draw, or argmax with
greedy_tail). With cached=True the denoiser is called only when some token changed since its last call (valid
because an MDLM without time conditioning is a function of z alone). Every step consumes the same random numbers
(two uniforms per position) whether or not the denoiser was called, so cached and uncached runs give identical samples.
Which positions unmask at which step depends on the unmasking uniforms alone, so the sampler replays them first
(one host sync) and then knows every denoiser call and the positions it serves: the loop has no host sync, and
with `row_logits` the denoiser computes x_θ at those positions only.

DUO step t → s: z_s ~ q(z_s | z_t, x̂ = x_θ(z_t)) (`uniform_posterior`, DUO eq. 4) from a uniform prior; the final step
from t_end is either an ancestral step to α = 1 or the greedy tail z = argmax x_θ(z, t_end). NFE = T + 1.

DiMO multi-step sampler (one-step generator of arXiv 2503.15457, used for N ≥ 1 steps): step 1 feeds the generator
x_init = i.i.d. uniform real tokens with exactly round(r_init·L) positions [MASK], and Gaussian noise in its input
embeddings (e ← s·n + √(1−s²)·e); it draws every position from softmax(z/T) (mask id excluded; the generator has no
SUBS carry-over). Step k ≥ 2 re-masks the round(r_init·L·((N−k+1)/N)^p) least confident positions (confidence = the
probability of the drawn token when it was drawn; prompt positions never), feeds that state (fresh embedding noise)
and redraws only the re-masked positions (remask="random": that many positions chosen uniformly at random instead,
as in the masked-diffusion forward process; confidence-based re-masking keeps the surest tokens, which favours
frequent ones and lowers the sample entropy as N grows). The power p (`remask_power`, default 1: a linear decay)
sets how much each later step redraws: p > 1 redraws less (at N = 4, p = 2: 56%, 25%, 6% of r_init·L instead of 75%,
50%, 25%), so more of the sample keeps its first, one-step draw. NFE = N.

Categorical draws use inverse-CDF sampling in float64 (one uniform per position; exact up to float64 rounding):
token = #{j : cdf_j ≤ u·cdf_K}, which never selects a zero-probability id.

Fused draws (`draw`, see `use_fused_draw`): on CUDA with nucleus_p = 1 and float64 draws, MDLM's x_θ draw, DUO's
posterior draw and both greedy tails run in `ddistill.kernels.sampling` (softmax, posterior and inverse CDF in
float64 registers, row by row; no B×L×V float64 tensor). They consume the same uniforms as the torch path and agree
with it token for token except where u·total falls within float64 rounding of a CDF boundary. The torch path stays
the reference (nucleus_p < 1, other dtypes, CPU, draw="torch").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ddistill.diffusion.absorbing import exact_count_mask
from ddistill.diffusion.schedules import NoiseSchedule
from ddistill.diffusion.uniform import uniform_posterior
from ddistill.kernels.sampling import draw_categorical, draw_uniform_posterior, masked_argmax

__all__ = ["DRAWS", "use_fused_draw", "SampleResult", "Denoiser", "sample_categorical", "nucleus_filter", "sample_mdlm", "sample_duo",
           "sample_dimo", "dimo_initial_tokens"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DIMO_REMASK = ("confidence", "random")  # which positions sample_dimo re-masks at steps k >= 2


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor  # LongTensor (B, L)
    nfe: int  # number of denoiser calls


def sample_categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from unnormalised probabilities (…, V) given uniforms u (…) in [0, 1)."""
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    total = cdf[..., -1:].contiguous()
    idx = torch.searchsorted(cdf, u.to(torch.float64).unsqueeze(-1) * total, right=True)
    # u·total can round up to total; the first index reaching the total is the last id with positive mass.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(-1)


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose mass reaches top_p (always ≥ 1 id), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    total = sorted_p.sum(dim=-1, keepdim=True)
    sorted_p = sorted_p.masked_fill(mass_before >= top_p * total, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def _check_common(num_steps: int, nucleus_p: float, t_end: float, batch_size: int, length: int, prefix) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1")
    if not 0.0 < nucleus_p <= 1.0:
        raise ValueError(f"nucleus_p={nucleus_p} must lie in (0, 1]")
    if not 0.0 < t_end < 1.0:
        raise ValueError(f"t_end={t_end} must lie in (0, 1)")
    if prefix is not None and (prefix.dim() != 2 or prefix.shape[0] != batch_size or prefix.shape[1] > length):
        raise ValueError(f"prefix of shape {tuple(prefix.shape)} must be (batch_size={batch_size}, P <= {length})")


def _call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, vocab_size: int) -> torch.Tensor:
    logits = denoiser(x, sigma.expand(x.shape[0]))
    if logits.shape != (*x.shape, vocab_size):
        raise ValueError(f"denoiser returned logits of shape {tuple(logits.shape)}, expected {(*x.shape, vocab_size)}")
    return logits


def _sigma(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    return schedule.sigma(t).float().reshape(1)


DRAWS = ("auto", "fused", "torch")


def use_fused_draw(draw: str, device: torch.device, nucleus_p: float, dtype: torch.dtype) -> bool:
    """Whether a sampler draws with the fused Triton kernels (`ddistill.kernels.sampling`) instead of the torch path.

    "auto": fused on CUDA when the draw is the plain float64 categorical (nucleus_p = 1, dtype float64); "torch"
    forces the reference path; "fused" forces the kernels (on CPU they run in Triton's interpreter)."""
    if draw not in DRAWS:
        raise ValueError(f"draw={draw!r}: expected one of {DRAWS}")
    exact = nucleus_p >= 1.0 and dtype == torch.float64
    if draw == "fused" and not exact:
        raise ValueError(f"draw='fused' needs nucleus_p=1 and dtype=float64 (got nucleus_p={nucleus_p}, dtype={dtype})")
    return draw == "fused" or (draw == "auto" and exact and device.type == "cuda")


def _mdlm_reveal_steps(x: torch.Tensor, mask_id: int, p_unmask: torch.Tensor, generator: torch.Generator,
                       num_steps: int) -> torch.Tensor:
    """The step at which each [MASK] position of x is revealed (num_steps: by the final fill; −1: never masked).

    Consumes exactly the random numbers of the sampling loop (u_unmask, u_token per step; the caller restores the
    generator's state afterwards): whether a position unmasks at a step depends on the u_unmask's only, never on
    the tokens drawn, so the whole schedule, hence every denoiser call of the cached sampler, is known up front."""
    reveal = torch.where(x == mask_id, num_steps, -1)
    for k in range(num_steps):
        u_unmask = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)  # u_token, unused here
        reveal = torch.where((reveal == num_steps) & (u_unmask < p_unmask[k]), k, reveal)
    return reveal


@torch.no_grad()
def sample_mdlm(
    denoiser: Denoiser,
    *,
    batch_size: int,
    length: int,
    num_steps: int,
    mask_id: int,
    vocab_size: int,
    schedule: NoiseSchedule,
    cached: bool = True,
    nucleus_p: float = 1.0,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
    prefix: torch.Tensor | None = None,
    time_conditioning: bool = False,
    greedy_tail: bool = False,
    t_end: float = 1e-5,
    draw: str = "auto",
    row_logits: bool = False,
) -> SampleResult:
    """MDLM ancestral sampling (module docstring). `vocab_size` counts all logit columns, mask id included.

    The unmasking schedule is computed first (`_mdlm_reveal_steps`, one host sync), so the loop knows which steps
    call the denoiser and which positions each call's logits serve; no step syncs with the host (`draw`: see
    `use_fused_draw`). With `row_logits` the denoiser is called as denoiser(x, σ, rows=positions) and returns the logits
    of those flat positions b·L + l only, (len(positions), V), as `DiT.forward` does: at a step only the positions
    that take a token need x_θ, and the output layer is a large part of a small model's cost."""
    _check_common(num_steps, nucleus_p, t_end, batch_size, length, prefix)
    if cached and time_conditioning:
        raise ValueError("cached=True requires a denoiser without time conditioning (time_conditioning=False)")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} must lie in [0, vocab_size={vocab_size})")
    device = torch.device(device)
    fused = use_fused_draw(draw, device, nucleus_p, dtype)
    x = torch.full((batch_size, length), mask_id, dtype=torch.long, device=device)
    if prefix is not None:
        x[:, : prefix.shape[1]] = prefix.to(device)
    ts = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64, device=device)
    alphas = schedule.alpha(ts)
    p_unmask = (alphas[1:] - alphas[:-1]) / (1.0 - alphas[:-1])
    mask_col = torch.tensor([mask_id], device=device)

    start = generator.get_state()
    reveal = _mdlm_reveal_steps(x, mask_id, p_unmask, generator, num_steps).reshape(-1)
    generator.set_state(start)
    counts = torch.bincount(reveal + 1, minlength=num_steps + 2).tolist()  # the one host sync
    # Positions grouped by the step that reveals them, ascending within a step (the row-major order of a boolean
    # mask); step_rows[num_steps] are those the final fill takes.
    order = torch.argsort(reveal, stable=True)
    bounds = [counts[0]]
    for count in counts[1:]:
        bounds.append(bounds[-1] + count)
    step_rows = [order[bounds[k] : bounds[k + 1]] for k in range(num_steps + 1)]
    # the step whose positions a denoiser call at step k serves: the first k' >= k that reveals anything
    serves: list[int | None] = [None] * (num_steps + 2)
    for k in range(num_steps, -1, -1):
        serves[k] = k if counts[k + 1] else serves[k + 1]

    def denoise(x: torch.Tensor, k: int) -> torch.Tensor:
        """x_θ logits (n, V) of x at step k, at the positions step serves[k] fills."""
        rows = order[:0] if serves[k] is None else step_rows[serves[k]]
        sigma = _sigma(schedule, ts[k])
        if not row_logits:
            return _call(denoiser, x, sigma, vocab_size).reshape(-1, vocab_size)[rows]
        logits = denoiser(x, sigma.expand(batch_size), rows=rows)
        if logits.shape != (rows.numel(), vocab_size):
            raise ValueError(f"denoiser(x, sigma, rows=…) returned logits of shape {tuple(logits.shape)}, expected "
                             f"{(rows.numel(), vocab_size)}")
        return logits

    def take(x: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, greedy: bool = False):
        """x with the positions `rows` filled from x_θ (SUBS without the carry-over: those positions are masked)."""
        if fused:
            tokens = masked_argmax(logits, exclude=mask_id) if greedy else draw_categorical(
                logits, u.reshape(-1)[rows], exclude=mask_id)
        else:  # torch path: nucleus and the float64 draw on the rows that take a token
            p = nucleus_filter(torch.softmax(logits.to(dtype).index_fill(-1, mask_col, float("-inf")), dim=-1),
                               nucleus_p)
            tokens = p.argmax(dim=-1) if greedy else sample_categorical(p, u.reshape(-1)[rows])
        return x.reshape(-1).index_copy(0, rows, tokens).reshape(x.shape)

    nfe = 0
    logits = None  # the denoiser's logits for the current x (at the positions they serve), when valid
    for k in range(num_steps):
        torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)  # u_unmask, folded into reveal
        u_token = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
        if logits is None or not cached:
            logits = denoise(x, k)
            nfe += 1
        if counts[k + 1]:
            x = take(x, logits, step_rows[k], u_token)
            logits = None
    u_token = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
    if counts[num_steps + 1]:
        if logits is None or not cached:
            logits = denoise(x, num_steps)
            nfe += 1
        x = take(x, logits, step_rows[num_steps], u_token, greedy=greedy_tail)
    return SampleResult(tokens=x, nfe=nfe)


@torch.no_grad()
def sample_duo(
    denoiser: Denoiser,
    *,
    batch_size: int,
    length: int,
    num_steps: int,
    vocab_size: int,
    schedule: NoiseSchedule,
    nucleus_p: float = 1.0,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
    prefix: torch.Tensor | None = None,
    greedy_tail: bool = True,
    t_end: float = 1e-5,
    draw: str = "auto",
) -> SampleResult:
    """DUO (uniform-state) ancestral sampling over K = vocab_size ids; NFE = num_steps + 1. `draw`: `use_fused_draw`
    (the fused path never forms a B×L×K float64 tensor; its greedy tail is the argmax of the logits)."""
    _check_common(num_steps, nucleus_p, t_end, batch_size, length, prefix)
    device = torch.device(device)
    fused = use_fused_draw(draw, device, nucleus_p, dtype)
    x = torch.randint(0, vocab_size, (batch_size, length), generator=generator, device=device)
    num_fixed = 0 if prefix is None else prefix.shape[1]
    if prefix is not None:
        prefix = prefix.to(device)
        x[:, :num_fixed] = prefix
    ts = torch.linspace(1.0, t_end, num_steps + 1, dtype=torch.float64, device=device)
    alphas = schedule.alpha(ts)
    one = torch.ones((), dtype=torch.float64, device=device)

    for k in range(num_steps + 1):
        u = torch.rand(x.shape, generator=generator, device=device, dtype=torch.float64)
        logits = _call(denoiser, x, _sigma(schedule, ts[k]), vocab_size)
        greedy = k == num_steps and greedy_tail
        alpha_s = alphas[k + 1] if k < num_steps else one
        if fused:
            x = masked_argmax(logits) if greedy else draw_uniform_posterior(logits, x, u, alphas[k], alpha_s)
        else:
            probs = nucleus_filter(torch.softmax(logits.to(dtype), dim=-1), nucleus_p)
            x = probs.argmax(dim=-1) if greedy else sample_categorical(uniform_posterior(probs, x, alphas[k], alpha_s), u)
        if prefix is not None:
            x[:, :num_fixed] = prefix
    return SampleResult(tokens=x, nfe=num_steps + 1)


def dimo_initial_tokens(token_u: torch.Tensor, position_u: torch.Tensor, *, r_init: float, mask_id: int,
                        vocab_size: int) -> torch.Tensor:
    """DiMO's x_init from uniforms (B, L): i.i.d. uniform ids over the vocabulary without `mask_id`, then exactly
    k = clamp(round(r_init·L), 1, L) positions per row (the k smallest `position_u`) set to `mask_id`."""
    if not 0.0 < r_init <= 1.0:
        raise ValueError(f"r_init={r_init} must lie in (0, 1]")
    ids = (token_u.to(torch.float64) * (vocab_size - 1)).long().clamp_max(vocab_size - 2)
    ids = ids + (ids >= mask_id).long()  # skip the mask id
    length = token_u.shape[-1]
    count = min(max(round(r_init * length), 1), length)
    counts = torch.full((token_u.shape[0],), count, device=token_u.device)
    return torch.where(exact_count_mask(position_u, counts), mask_id, ids)


@torch.no_grad()
def sample_dimo(
    generator_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int,
    length: int,
    num_steps: int,
    mask_id: int,
    vocab_size: int,
    embed_dim: int,
    r_init: float = 0.6,
    embed_noise: float = 0.1,
    noise_rms: float = 1.0,
    temperature: float = 1.0,
    nucleus_p: float = 1.0,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
    prefix: torch.Tensor | None = None,
    remask: str = "confidence",
    remask_power: float = 1.0,
) -> SampleResult:
    """DiMO multi-step sampling (module docstring). `generator_fn(x, sigma, embed_noise=(s, n)) -> logits (B, L, V)`
    is the distilled generator (a DiT); n = noise_rms · N(0, I) of shape (B, L, embed_dim), σ = −log(1 − r_init)."""
    _check_common(num_steps, nucleus_p, 0.5, batch_size, length, prefix)
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 <= embed_noise <= 1.0:
        raise ValueError(f"embed_noise={embed_noise} must lie in [0, 1]")
    if remask not in DIMO_REMASK:
        raise ValueError(f"remask={remask!r}; allowed values: {list(DIMO_REMASK)}")
    if not (math.isfinite(remask_power) and remask_power > 0):
        raise ValueError(f"remask_power={remask_power} must be a positive finite number")
    device = torch.device(device)
    shape = (batch_size, length)
    x = dimo_initial_tokens(torch.rand(shape, generator=generator, device=device, dtype=torch.float64),
                            torch.rand(shape, generator=generator, device=device, dtype=torch.float64),
                            r_init=r_init, mask_id=mask_id, vocab_size=vocab_size)
    fixed = torch.zeros(shape, dtype=torch.bool, device=device)
    if prefix is not None:
        x[:, : prefix.shape[1]] = prefix.to(device)
        fixed[:, : prefix.shape[1]] = True
    sigma = torch.full((batch_size,), -math.log(max(1.0 - r_init, 1e-4)), device=device)
    mask_col = torch.tensor([mask_id], device=device)
    confidence = torch.full(shape, float("inf"), dtype=dtype, device=device)
    redraw = ~fixed  # step 1 draws every free position
    for k in range(1, num_steps + 1):
        if k > 1:
            count = round(r_init * length * ((num_steps - k + 1) / num_steps) ** remask_power)
            if remask == "random":
                confidence = torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(dtype)
            scores = torch.where(fixed, torch.full_like(confidence, float("inf")), confidence)
            redraw = exact_count_mask(scores, torch.full((batch_size,), count, device=device)) & ~fixed
            x = torch.where(redraw, mask_id, x)
        noise = torch.randn((*shape, embed_dim), generator=generator, device=device) * noise_rms
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        logits = generator_fn(x, sigma, embed_noise=(embed_noise, noise))
        if logits.shape != (*shape, vocab_size):
            raise ValueError(f"generator returned logits of shape {tuple(logits.shape)}, expected {(*shape, vocab_size)}")
        rows = logits[redraw].to(dtype) / temperature
        probs = nucleus_filter(torch.softmax(rows.index_fill(-1, mask_col, float("-inf")), dim=-1), nucleus_p)
        tokens = sample_categorical(probs, u[redraw])
        x = x.masked_scatter(redraw, tokens)
        confidence = confidence.masked_scatter(redraw, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    return SampleResult(tokens=x, nfe=num_steps)
