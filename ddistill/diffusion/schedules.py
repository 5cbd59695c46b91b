"""Noise schedules α_t and antithetic (stratified) time sampling.

A schedule maps diffusion time t ∈ [0, 1] to the signal level α_t (probability that a token is still clean),
α_0 ≈ 1, α_1 ≈ 0, with derivative α'_t = dα_t/dt < 0 and conditioning input σ_t = −log α_t.

* log-linear (MDLM, arXiv 2406.07524; DUO, arXiv 2506.10892 §3):  α_t = 1 − (1−ε)t,  α'_t = −(1−ε),  ε = 1e-3.
  The MDLM ELBO weight α'/(1−α) then equals −1/t.
* cosine (DUO Ch. II):  α_t = 1 − cos(π/2 · (1 − t')),  t' = (1−ε)t,  α'_t = −(π/2)(1−ε) sin(π/2 · (1 − t')).

Training times are stratified over the *global* batch of N sequences (DUO `_sample_t`): with one U ~ U[0,1) drawn from
a generator that is identical on every rank, u_i = (U + i)/N mod 1 puts exactly one point in each stratum
[k/N, (k+1)/N); a rank takes the slice [offset, offset + num) and maps it to t = t_min + (1 − t_min)·u.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NoiseSchedule", "LogLinearSchedule", "CosineSchedule", "build_schedule", "sample_times", "SCHEDULES"]


class NoiseSchedule:
    """Base class: subclasses define `alpha` and `alpha_prime`; `sigma = −log α`."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log(self.alpha(t))


@dataclass(frozen=True, kw_only=True)
class LogLinearSchedule(NoiseSchedule):
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        # log1p keeps σ accurate near t = 0 where α_t → 1.
        return -torch.log1p(-(1.0 - self.eps) * t)


@dataclass(frozen=True, kw_only=True)
class CosineSchedule(NoiseSchedule):
    eps: float = 1e-3

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.cos(0.5 * math.pi * (1.0 - (1.0 - self.eps) * t))

    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * (1.0 - self.eps) * torch.sin(0.5 * math.pi * (1.0 - (1.0 - self.eps) * t))


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    "loglinear": LogLinearSchedule,
    "log-linear": LogLinearSchedule,
    "log_linear": LogLinearSchedule,
    "cosine": CosineSchedule,
}


def build_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name (`loglinear` / `log-linear` / `log_linear`, `cosine`); kwargs go to its dataclass."""
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {sorted(SCHEDULES)}") from None
    return cls(**kwargs)


def sample_times(
    num: int,
    *,
    global_batch: int,
    offset: int,
    generator: torch.Generator,
    device: torch.device | str,
    t_min: float = 1e-3,
    antithetic: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Times for rows [offset, offset+num) of a global batch of `global_batch` rows, in [t_min, 1].

    The whole global draw is made from `generator` (which must be in the same state on all ranks) and then sliced,
    so the union of all ranks' slices equals the single-process draw. Antithetic: one shared U, stratified
    u_i = (U + i)/N mod 1; otherwise i.i.d. uniforms.
    """
    if num < 0 or offset < 0 or offset + num > global_batch:
        raise ValueError(f"slice [offset={offset}, offset+num={offset + num}) is outside global_batch={global_batch}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min={t_min} must lie in [0, 1)")
    if antithetic:
        u0 = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
        steps = torch.arange(global_batch, device=generator.device, dtype=torch.float64)
        u = torch.remainder((u0 + steps) / global_batch, 1.0)
    else:
        u = torch.rand(global_batch, generator=generator, device=generator.device, dtype=torch.float64)
    t = t_min + (1.0 - t_min) * u[offset : offset + num]
    return t.to(device=device, dtype=dtype)
