"""Discrete diffusion math: noise schedules, absorbing (MDLM) and uniform (DUO) losses, the Gaussian duality, samplers.

Pure PyTorch / NumPy; knows nothing of DeepSpeed. Denoisers are passed as callables `denoiser(x, sigma) -> logits`.
"""

from ddistill.diffusion.absorbing import mask_tokens, mdlm_loss, mdlm_loss_per_token, subs_log_probs
from ddistill.diffusion.duality import DualityTable, duality_alpha, gaussian_scales
from ddistill.diffusion.samplers import SampleResult, sample_dimo, sample_duo, sample_mdlm
from ddistill.diffusion.schedules import CosineSchedule, LogLinearSchedule, NoiseSchedule, build_schedule, sample_times
from ddistill.diffusion.uniform import corrupt_uniform, duo_elbo_per_token, udlm_loss_per_token, uniform_posterior

__all__ = [
    "CosineSchedule",
    "DualityTable",
    "LogLinearSchedule",
    "NoiseSchedule",
    "SampleResult",
    "build_schedule",
    "corrupt_uniform",
    "duality_alpha",
    "duo_elbo_per_token",
    "gaussian_scales",
    "mask_tokens",
    "mdlm_loss",
    "mdlm_loss_per_token",
    "sample_dimo",
    "sample_duo",
    "sample_mdlm",
    "sample_times",
    "subs_log_probs",
    "udlm_loss_per_token",
    "uniform_posterior",
]
