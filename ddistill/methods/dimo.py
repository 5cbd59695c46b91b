"""DiMO for text: on-policy distillation of a masked-diffusion LM into a one-step generator (Zhu, Wang, Lathuilière,
Kalogeiton, "Di[M]O: Distilling Masked Diffusion Models into One-step Generator", ICCV 2025, arXiv 2503.15457),
ported from images to MDLM text models (../shared/reference/dimo.md §0, §1, §4).

Networks, all initialised from the teacher checkpoint (`init_from`): the generator G_θ (trained, EMA with warm-up;
its EMA is the output model), the teacher p_φ (frozen, ZeRO-3, eval mode) and the auxiliary model p_ψ (trained, its
own optimizer, no clipping). The input embeddings of G and ψ are frozen (`freeze_embeddings`, DiMO's
fix_emb_layer). Optimizers as released: Adam (not AdamW), β = (0.9, 0.999), eps 1e-6, weight decay 0, constant LR
1e-5 after 100 warm-up steps; G clipped at global norm 1.0, ψ unclipped (overridable per network:
`networks.aux.optim.lr=...`). Data-free: the data batch only sets the shapes (B, L).

Generator input x_init: i.i.d. uniform real tokens (mask id excluded), exactly k = round(r_init·L) positions [MASK]
(a uniformly random subset), and Gaussian noise in G's input embeddings only, e ← σ·n + √(1−σ²)·e, with n scaled
to the RMS of the embedding table (`embed_noise_rms`; the reference's unit noise assumes unit-scale embeddings, the
DiT's are ≈ 1/√(3d)). The generator predicts every position: raw logits z_θ, no SUBS carry-over, the mask logit at
−∞ for sampling. x_θ ~ softmax(z_θ/T_gen) per position (no gradient through the sample).

Intermediate state x̃_t: x_θ with exactly round(L·m) positions re-masked, m = arccos(u)/(π/2) ("arccos"),
cos(πu/2) clamped to [0.02, 0.98] ("cosine") or u ("linear"), u ~ U(0, 1) per sequence. Teacher and aux see
σ = −log(1 − m) (used only if they are time-conditioned), the generator σ = −log(1 − r_init).

Generator update (phase "generator"): at the positions M masked in x̃_t, with p = p_φ(·|x̃_t), q = p_ψ(·|x̃_t) over
the real tokens (SUBS, no gradient),

    g = (1 − β)·(q − p) + β·q ⊙ (log q − log p − KL(q‖p))

is injected as the gradient of G's logits through the surrogate Σ_{rows ∈ M} [⟨z, g⟩ − ⟨sg(z), g⟩ + ½‖g‖²] / B:
value ½Σ‖g‖²/B (DiMO's loss_dm), ∂/∂z = g/B, 0 at unmasked rows and at the mask column. g is the gradient w.r.t.
the logits of q of the generalized Jeffreys divergence (1 − β)·KL(p‖q) + β·KL(q‖p) (β = 0: forward KL, the released
configs; β = 1: reverse KL).

Auxiliary update (phase "aux", after the generator's update, `aux_steps` times per optimizer step): a fresh x_init,
a sample of the *updated* generator (no gradient), independently re-masked (`aux_remask`), and the masked
cross-entropy with label smoothing ε over the K = V − 1 real tokens,

    CE_ε(z, y) = (1 − ε)·(−log q_y) + ε·(1/K)·Σ_v (−log q_v),

averaged over the masked tokens of the global batch (each micro-batch normalises by B·mean_global(k), so the
result does not depend on the split over ranks and micro-batches).

Refinement inputs (`refine_frac` = f, default 0, not in the released recipe): the multi-step sampler
(`diffusion.samplers.sample_dimo`) feeds the generator, from its second step on, its own previous draw with some
positions re-masked, an input x_init never resembles (real context, no random tokens). With f > 0, a fraction f of
the rows (each row with probability f, from a global draw) takes such an input instead of x_init: a draw x⁰ of the
current generator from a fresh x_init (no gradient), with exactly k = clamp(round(u·r_init·L), 1, L) positions
re-masked, u ~ U(0, 1) per row, at uniformly random positions (the sampler's later steps re-mask fewer than
r_init·L positions). Such a row's x_θ keeps x⁰ where it was not re-masked and takes the generator's draw where it
was (the sampler's update), so its generator gradient acts only at the masked positions of x̃_t that were redrawn,
and the auxiliary model sees the same mixture of one-step and refined samples (its data is the generator's output
distribution). f = 0 draws exactly the random numbers of the released update.

Aux warm-up (`aux_warmup_steps` = n, default 0, not in the released recipe): in the first n optimizer steps the
generator phase returns no loss, so only ψ learns the generator's (initial) distribution before G follows the
gradient g = ψ − teacher; with ψ = φ at initialisation, g is zero until ψ has moved (the aux lag of dimo.md §4.3).

`loss_impl="triton"`: the generator loss by the fused kernel `ddistill.kernels.dimo_generator_loss` from hidden
states (teacher, aux and generator logits at the masked rows never reach memory; the generator's full logits are
computed once without graph for its sample); `"chunked"`: the same kernel's row-chunked cuBLAS path (aux and teacher
logits one chunk at a time, the generator's gradient formed in the forward). With either, the aux loss CE_ε runs
from the aux model's hidden states through `ddistill.kernels.masked_diffusion_loss(impl="chunked",
label_smoothing=ε)` (the Triton CE kernel has no label smoothing): no (rows, V) logits tensor with a graph.

The generator's metrics (mean max-probability and entropy of softmax(z_θ) over the real tokens) are formed by
`ddistill.kernels.sampling.softmax_stats` wherever x_θ is drawn by the fused kernel (`draw`), in one read of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F

from ddistill.diffusion.absorbing import exact_count_mask
from ddistill.diffusion.samplers import DRAWS, use_fused_draw, dimo_initial_tokens, sample_categorical
from ddistill.kernels.masked_diffusion import masked_diffusion_loss
from ddistill.kernels.sampling import draw_categorical, softmax_stats
from ddistill.methods import register
from ddistill.methods.base import (
    EvalStudent,
    Method,
    NetworkSpec,
    Phase,
    StepContext,
    StepOutput,
    fused_kernel,
    global_normal,
)

__all__ = ["DiMO", "DiMOConfig", "REMASK_SCHEDULES", "remask_ratio", "jeffreys_logit_gradient",
           "generator_surrogate", "aux_cross_entropy"]

Remask = Literal["arccos", "cosine", "linear"]
REMASK_SCHEDULES = ("arccos", "cosine", "linear")
SAMPLE_CHUNK_ROWS = 2048  # rows per float64 softmax/CDF chunk when sampling the generator


@dataclass(kw_only=True)
class DiMOConfig:
    """DiMO hyper-parameters (YAML section `method:`); defaults are the released MaskGIT recipe (dimo.md §1.8)."""

    r_init: float = 0.6  # mask fraction of x_init
    embed_noise: float = 0.1  # σ of the generator's input-embedding noise
    embed_noise_rms: bool = True  # scale the noise to the RMS of the embedding table
    beta: float = 0.0  # generalized Jeffreys coefficient (0 = forward KL)
    remask: Remask = "arccos"  # ratio schedule of x̃_t for the generator loss
    aux_remask: Remask = "arccos"  # and for the aux loss
    label_smoothing: float = 0.1
    aux_steps: int = 1  # k auxiliary updates per generator update (DiMO's fake_rounds)
    aux_warmup_steps: int = 0  # first optimizer steps in which only the aux model learns (the generator waits)
    refine_frac: float = 0.0  # fraction of rows whose generator input is its own re-masked draw (module docstring)
    gen_temperature: float = 1.0  # sampling temperature of x_θ in training
    freeze_embeddings: bool = True
    dropout: float | None = None  # dropout of the generator and aux in training (None: the checkpoint's)
    loss_impl: Literal["torch", "triton", "chunked"] = "torch"
    draw: Literal["auto", "fused", "torch"] = "auto"  # x_θ draws: fused Triton kernel on CUDA ("auto"), or torch
    # evaluation: how `sampler_spec` / `eval_students` sample the distilled generator
    eval_steps: int = 1
    eval_temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.r_init <= 1.0:
            raise ValueError(f"method.r_init={self.r_init} must lie in (0, 1]")
        if not 0.0 <= self.embed_noise < 1.0:
            raise ValueError(f"method.embed_noise={self.embed_noise} must lie in [0, 1)")
        if self.r_init == 1.0 and self.embed_noise == 0.0:
            raise ValueError("method.r_init=1 with embed_noise=0 gives the generator a deterministic input (a product "
                             "of marginals, dimo.md §4.3); lower r_init or add embedding noise")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"method.label_smoothing={self.label_smoothing} must lie in [0, 1)")
        if self.aux_steps < 1:
            raise ValueError(f"method.aux_steps={self.aux_steps} must be >= 1")
        if self.aux_warmup_steps < 0:
            raise ValueError(f"method.aux_warmup_steps={self.aux_warmup_steps} must be >= 0")
        if not 0.0 <= self.refine_frac <= 1.0:
            raise ValueError(f"method.refine_frac={self.refine_frac} must lie in [0, 1]")
        for key in ("gen_temperature", "eval_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"method.{key}={getattr(self, key)} must be > 0")
        if self.eval_steps < 1:
            raise ValueError(f"method.eval_steps={self.eval_steps} must be >= 1")
        if self.draw not in DRAWS:
            raise ValueError(f"method.draw={self.draw!r}: expected one of {list(DRAWS)}")


def remask_ratio(u: torch.Tensor, schedule: str) -> torch.Tensor:
    """Mask ratio m ∈ (0, 1] of x̃_t from u ~ U(0, 1) (module docstring)."""
    u = u.to(torch.float64)
    if schedule == "arccos":
        return torch.arccos(u) / (math.pi / 2)
    if schedule == "cosine":
        return torch.cos(math.pi * u / 2).clamp(0.02, 0.98)
    if schedule == "linear":
        return u
    raise ValueError(f"unknown remask schedule {schedule!r}; choose one of {list(REMASK_SCHEDULES)}")


def jeffreys_logit_gradient(aux_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """g = (1 − β)(q − p) + β q ⊙ (log q − log p − KL(q‖p)) per row, q = softmax(aux), p = softmax(teacher), over the
    columns given (callers drop the mask column), in the logits' dtype."""
    log_q = torch.log_softmax(aux_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    g = (1.0 - beta) * (q - p)
    if beta != 0.0:
        a = log_q - log_p
        g = g + beta * q * (a - (q * a).sum(-1, keepdim=True))
    return g


def generator_surrogate(gen_logits: torch.Tensor, g: torch.Tensor, normalizer: float) -> torch.Tensor:
    """Σ_rows [⟨z, g⟩ − ⟨sg(z), g⟩ + ½‖g‖²] / normalizer: value ½Σ‖g‖²/normalizer, gradient g/normalizer (g const)."""
    z = gen_logits.float()
    g = g.to(z.dtype)
    return ((z * g).sum() - (z.detach() * g).sum() + 0.5 * g.square().sum()) / normalizer


def aux_cross_entropy(aux_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float,
                      normalizer: float | torch.Tensor) -> torch.Tensor:
    """Σ_rows CE_ε(z, y) / normalizer over the real-token columns given (module docstring)."""
    log_q = torch.log_softmax(aux_logits.float(), dim=-1)
    nll = -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    smooth = -log_q.mean(-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).sum() / normalizer


class GeneratorInput(NamedTuple):
    """The generator's input tokens (B, L), its embedding noise (σ, n), and the positions whose generator draw
    enters x_θ (None: every position; a refinement row keeps its other tokens)."""

    tokens: torch.Tensor
    noise: tuple[float, torch.Tensor]
    redraw: torch.Tensor | None

    def merge(self, draw: torch.Tensor) -> torch.Tensor:
        """x_θ: the generator's draw where it redraws, the input's tokens elsewhere."""
        return draw if self.redraw is None else torch.where(self.redraw, draw, self.tokens)


def _sigma_of_ratio(ratio: torch.Tensor) -> torch.Tensor:
    """σ = −log α with α = 1 − ratio (floored at 1e-4 so a fully masked row stays finite)."""
    return -torch.log((1.0 - ratio.to(torch.float64)).clamp_min(1e-4)).to(torch.float32)


@register
class DiMO(Method):
    """Generator / frozen teacher / auxiliary model, updated in two phases per optimizer step."""

    name: ClassVar[str] = "dimo"
    Config: ClassVar[type] = DiMOConfig
    output_network: ClassVar[str] = "generator"

    def __init__(self, cfg: DiMOConfig, *, vocab_size: int, mask_id: int):
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary of size {vocab_size}")
        super().__init__(cfg, vocab_size=vocab_size, mask_id=mask_id)
        self.keep = torch.tensor([v for v in range(vocab_size) if v != mask_id])  # the real-token columns
        self._keep_on: dict[torch.device, torch.Tensor] = {}
        self._fused = fused_kernel("dimo_generator_loss", cfg.loss_impl) if cfg.loss_impl != "torch" else None

    # -- networks and phases -------------------------------------------------------------------------------------

    def networks(self) -> dict[str, NetworkSpec]:
        frozen = ("vocab_embed.",) if self.cfg.freeze_embeddings else ()
        overrides = {} if self.cfg.dropout is None else {"dropout": self.cfg.dropout}
        adam = {"algorithm": "adam", "lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0,
                "warmup_steps": 100, "schedule": "constant"}
        return {
            "teacher": NetworkSpec(role="frozen", init="pretrained"),
            "generator": NetworkSpec(role="trained", init="copy:teacher", ema=True, frozen_params=frozen,
                                     model_overrides=overrides, optim={**adam, "grad_clip": 1.0}),
            "aux": NetworkSpec(role="trained", init="copy:teacher", frozen_params=frozen, model_overrides=overrides,
                               optim={**adam, "grad_clip": 0.0}),
        }

    def phases(self) -> list[Phase]:
        return [Phase(name="generator", networks=("generator",)),
                Phase(name="aux", networks=("aux",), repeats=self.cfg.aux_steps)]

    def sampler_spec(self) -> dict:
        return {"process": "dimo", "num_steps": self.cfg.eval_steps, "r_init": self.cfg.r_init,
                "embed_noise": self.cfg.embed_noise, "embed_noise_rms": self.cfg.embed_noise_rms,
                "temperature": self.cfg.eval_temperature}

    def eval_students(self) -> list[EvalStudent]:
        return [EvalStudent(label=self.name, step=None, network="generator", sampler="dimo")]

    # -- shared pieces -------------------------------------------------------------------------------------------

    def _global_rows(self, ctx: StepContext, rows: int, tail: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 U[0,1) for the whole global batch (every rank draws it) and this micro-batch's rows of it."""
        full = torch.rand((ctx.global_batch_size, *tail), generator=ctx.generator, device=ctx.device,
                          dtype=torch.float64)
        return full, full[ctx.global_offset : ctx.global_offset + rows]

    def initial_tokens(self, ctx: StepContext, rows: int, length: int) -> torch.Tensor:
        _, token_u = self._global_rows(ctx, rows, (length,))
        _, position_u = self._global_rows(ctx, rows, (length,))
        return dimo_initial_tokens(token_u, position_u, r_init=self.cfg.r_init, mask_id=self.mask_id,
                                   vocab_size=self.vocab_size)

    def embed_noise(self, ctx: StepContext, generator_net, rows: int, length: int) -> tuple[float, torch.Tensor]:
        module = generator_net.module
        noise = global_normal(ctx, rows, (length, module.config.hidden_size))
        if self.cfg.embed_noise_rms:
            noise = noise * module.input_embedding_rms_tensor()
        return self.cfg.embed_noise, noise

    def generator_input(self, nets, ctx: StepContext, rows: int, length: int) -> GeneratorInput:
        """The generator's input this micro-batch: x_init, or with `refine_frac` > 0 a refinement input in a fraction
        of the rows (module docstring)."""
        generator = nets["generator"]
        x_init = self.initial_tokens(ctx, rows, length)
        if self.cfg.refine_frac == 0.0:
            return GeneratorInput(x_init, self.embed_noise(ctx, generator, rows, length), None)
        with torch.no_grad():
            first_noise = self.embed_noise(ctx, generator, rows, length)
            first = self.sample_generator(generator(x_init, self._generator_sigma(rows, ctx.device),
                                                    embed_noise=first_noise), ctx)
        refine = self._global_rows(ctx, rows, ())[1] < self.cfg.refine_frac
        ratio = self._global_rows(ctx, rows, ())[1] * self.cfg.r_init
        counts = (ratio * length).round().clamp(1, length).long()
        remasked = exact_count_mask(self._global_rows(ctx, rows, (length,))[1], counts)
        tokens = torch.where(refine[:, None], torch.where(remasked, self.mask_id, first), x_init)
        redraw = remasked | ~refine[:, None]
        return GeneratorInput(tokens, self.embed_noise(ctx, generator, rows, length), redraw)

    def remask(self, ctx: StepContext, tokens: torch.Tensor, schedule: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
        """(x̃_t, its mask M, σ per row, and the global batch's total number of masked positions)."""
        rows, length = tokens.shape
        full, u = self._global_rows(ctx, rows, ())
        counts_full = (remask_ratio(full, schedule) * length).round().clamp(1, length).long()
        counts = counts_full[ctx.global_offset : ctx.global_offset + rows]
        _, position_u = self._global_rows(ctx, rows, (length,))
        masked = exact_count_mask(position_u, counts)
        xt = torch.where(masked, self.mask_id, tokens)
        return xt, masked, _sigma_of_ratio(counts.double() / length), counts_full.sum()

    def sample_generator(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x_θ ~ softmax(z/T_gen) per position over the real tokens, float64 inverse CDF on global uniforms.

        `draw` "fused" (the default "auto" on CUDA): `ddistill.kernels.draw_categorical` on the logits, the mask column
        excluded (the same tokens as the torch path up to float64 rounding at a CDF boundary; with T_gen ≠ 1 the
        logits are divided in their own dtype first); "torch": float64 softmax and inverse CDF in row chunks."""
        rows, length = logits.shape[:2]
        _, u = self._global_rows(ctx, rows, (length,))
        flat, u = logits.detach().reshape(-1, logits.shape[-1]), u.reshape(-1)
        if use_fused_draw(self.cfg.draw, logits.device, 1.0, torch.float64):
            if self.cfg.gen_temperature != 1.0:
                flat = flat / self.cfg.gen_temperature
            return draw_categorical(flat, u, exclude=self.mask_id).reshape(rows, length)
        keep = self.keep_on(logits.device)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=logits.device)
        for start in range(0, flat.shape[0], SAMPLE_CHUNK_ROWS):
            chunk = flat[start : start + SAMPLE_CHUNK_ROWS].index_select(-1, keep).to(torch.float64)
            probs = torch.softmax(chunk / self.cfg.gen_temperature, dim=-1)
            out[start : start + SAMPLE_CHUNK_ROWS] = keep[sample_categorical(probs, u[start : start + SAMPLE_CHUNK_ROWS])]
        return out.reshape(rows, length)

    def keep_on(self, device: torch.device) -> torch.Tensor:
        """The real-token columns on ``device``, copied there once (a host-to-device copy waits for the host)."""
        if device not in self._keep_on:
            self._keep_on[device] = self.keep.to(device)
        return self._keep_on[device]

    @torch.no_grad()
    def generator_stats(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over positions of max_v p_v and of the entropy of p = softmax(z) over the real tokens (T = 1)."""
        if use_fused_draw(self.cfg.draw, logits.device, 1.0, torch.float64):
            max_prob, entropy = softmax_stats(logits, exclude=self.mask_id)
            return max_prob.mean(), entropy.mean()
        probs = torch.softmax(logits.float().index_select(-1, self.keep_on(logits.device)), dim=-1)
        return probs.max(-1).values.mean(), -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()

    def _generator_sigma(self, rows: int, device: torch.device) -> torch.Tensor:
        return _sigma_of_ratio(torch.full((rows,), self.cfg.r_init, device=device))

    # -- one micro-batch -----------------------------------------------------------------------------------------

    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        rows, length = batch.shape
        if ctx.phase == "generator":
            if ctx.step < self.cfg.aux_warmup_steps:  # no loss: the engine neither backpropagates nor steps it
                return StepOutput(losses={}, metrics={}, num_tokens=0)
            return self._generator_step(nets, rows, length, ctx)
        if ctx.phase == "aux":
            return self._aux_step(nets, rows, length, ctx)
        raise ValueError(f"DiMO has phases 'generator' and 'aux', not {ctx.phase!r}")

    def _generator_step(self, nets, rows: int, length: int, ctx: StepContext) -> StepOutput:
        generator, teacher, aux = nets["generator"], nets["teacher"], nets["aux"]
        inputs = self.generator_input(nets, ctx, rows, length)
        sigma_g = self._generator_sigma(rows, ctx.device)
        if self._fused is None:
            z = generator(inputs.tokens, sigma_g, embed_noise=inputs.noise)  # (B, L, V) with graph
        else:
            hidden_g = generator.hidden_states(inputs.tokens, sigma_g, embed_noise=inputs.noise)
            weight_g, bias_g = generator.output_weight, generator.output_bias
            with torch.no_grad():  # the padded (V_pad, d) weight keeps the GEMM's output rows 16-byte aligned
                dtype = generator.head_dtype(ctx.device)
                z = F.linear(hidden_g.detach().to(dtype), weight_g.to(dtype), bias_g.to(dtype))[..., : self.vocab_size]
        x_gen = inputs.merge(self.sample_generator(z, ctx))
        xt, remasked, sigma_t, _ = self.remask(ctx, x_gen, self.cfg.remask)
        masked = remasked if inputs.redraw is None else remasked & inputs.redraw  # where G's logits get a gradient
        if self._fused is None:
            keep = self.keep_on(ctx.device)
            with torch.no_grad():
                z_t = teacher(xt, sigma_t, rows=masked).index_select(-1, keep).float()
                z_a = aux(xt, sigma_t, rows=masked).index_select(-1, keep).float()
                g_kept = jeffreys_logit_gradient(z_a, z_t, self.cfg.beta)
            z_masked = z[masked]
            g = torch.zeros(z_masked.shape, dtype=torch.float32, device=ctx.device)
            g[:, keep] = g_kept
            loss = generator_surrogate(z_masked, g, float(rows))
        else:
            loss = self._fused_generator_loss(nets, hidden_g, xt, sigma_t, masked, rows)
        max_prob, entropy = self.generator_stats(z.detach())
        metrics = {"dimo_loss_dm": loss.detach(), "gen_max_prob": max_prob, "gen_entropy": entropy,
                   "remask_frac": remasked.float().mean()}
        return StepOutput(losses={"generator": loss}, metrics=metrics, num_tokens=rows * length)

    def _fused_generator_loss(self, nets, hidden_g, xt, sigma_t, masked, rows: int) -> torch.Tensor:
        generator, teacher, aux = nets["generator"], nets["teacher"], nets["aux"]
        dim = hidden_g.shape[-1]
        hidden_t = teacher.hidden_states(xt, sigma_t)
        with torch.no_grad():
            hidden_a = aux.hidden_states(xt, sigma_t)
        dtype = generator.head_dtype(xt.device)
        with teacher.gathered_output() as (weight_t, bias_t):
            loss = self._fused(
                hidden_g.reshape(-1, dim).to(dtype), generator.output_weight, generator.output_bias,
                hidden_a.reshape(-1, dim).to(dtype), aux.output_weight.detach(), aux.output_bias.detach(),
                hidden_t.reshape(-1, dim).to(dtype), weight_t, bias_t, 1.0, self.vocab_size,
                beta=self.cfg.beta, mask_id=self.mask_id, row_mask=masked.reshape(-1), normalizer=float(rows),
                impl=self.cfg.loss_impl,
            )  # fmt: skip
        return loss.float()

    def _aux_step(self, nets, rows: int, length: int, ctx: StepContext) -> StepOutput:
        generator, aux = nets["generator"], nets["aux"]
        with torch.no_grad():
            inputs = self.generator_input(nets, ctx, rows, length)
            z = generator(inputs.tokens, self._generator_sigma(rows, ctx.device), embed_noise=inputs.noise)
            x_gen = inputs.merge(self.sample_generator(z, ctx))
        xt, masked, sigma_t, total_masked = self.remask(ctx, x_gen, self.cfg.aux_remask)
        normalizer = total_masked.double() * rows / ctx.global_batch_size
        if self._fused is None:
            keep = self.keep_on(ctx.device)
            z_a = aux(xt, sigma_t, rows=masked).index_select(-1, keep)
            targets = torch.searchsorted(keep, x_gen[masked])  # column of each target among the real tokens
            loss = aux_cross_entropy(z_a, targets, self.cfg.label_smoothing, normalizer).float()
        else:
            hidden_a = aux.hidden_states(xt, sigma_t)
            dim = hidden_a.shape[-1]
            loss = masked_diffusion_loss(
                hidden_a.reshape(-1, dim).to(aux.head_dtype(ctx.device)), aux.output_weight, aux.output_bias,
                x_gen.reshape(-1), 1.0, self.vocab_size, self.mask_id, is_masked=masked.reshape(-1),
                normalizer=normalizer, impl="chunked", label_smoothing=self.cfg.label_smoothing,
            ).float()  # fmt: skip
        return StepOutput(losses={"aux": loss}, metrics={"aux_ce": loss.detach()}, num_tokens=0)
