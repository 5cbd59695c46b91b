"""The contract between the training engine and a training method (base training or distillation).

A method declares its networks by role (trained ones get a ZeRO-2 engine with an optimizer, frozen ones a ZeRO-3
inference engine) and computes, for one micro-batch, one normalised scalar loss per network it updates. The engine
owns everything distributed: backward, optimizer steps, EMA, checkpoints. Round logic (teacher <- student, step
halving, ...) lives in `Method.on_step_end`, which acts on the networks through `NetworkControl`.

What a method declares (all typed, all optional beyond role/init):

* `NetworkSpec.optim`: this network's optimizer settings, as overrides of the run's `optim` section (keys of
  `engine.run_config.OptimConfig`: algorithm adam|adamw, lr, betas, eps, weight_decay, warmup_steps, schedule,
  min_lr, grad_clip <= 0 = no clipping). The user overrides them again per network from YAML
  (`networks.<name>.optim.<key>=...`). Precedence: run `optim` < `NetworkSpec.optim` < `networks.<name>.optim`.
* `NetworkSpec.frozen_params`: parameter-name prefixes (e.g. "vocab_embed.") that are not trained: they get no
  gradient, are not in the optimizer and stay bit-identical.
* Model keyword arguments: `nets[name](x, sigma, rows=..., **model_kwargs)` and `nets[name].hidden_states(x, sigma,
  **model_kwargs)` pass them to the DiT's forward (e.g. `embed_noise`).
* `Method.phases()`: the ordered update phases of one optimizer step, each a `Phase(name, networks, repeats)`.
  For every phase, `repeats` times, the engine runs `Method.step` on all micro-batches of the step (with
  `StepContext.phase` / `phase_repeat` set), back-propagates the losses it returned and steps exactly those
  networks; a later phase therefore sees the weights updated by the earlier ones (DiMO: generator, then k auxiliary
  updates on samples of the updated generator). A phase's losses must name networks of that phase; a network
  without a loss is neither back-propagated nor stepped, and the set of networks with a loss must be the same on
  every micro-batch of a phase repetition (it is a function of (step, phase), not of the data). Default: one phase
  "step" over all trained networks (every existing method).
* `Method.output_network`: the trained network that is exported (its EMA if it has one) and evaluated; default
  "student".

Checkpoints hold every network (trained: DeepSpeed state with its optimizer; frozen: current weights), every EMA
and the per-network update counters, and resume exactly.

Against ../shared/DESIGN.md (the older sketch): DESIGN.md already asks for per-network optimizers, parameter
filters and ordered phases; it names the exported network as part of a network's declaration, where this contract
has one `Method.output_network`; it does not mention model keyword arguments through the network wrapper or the
per-network update counters kept in checkpoints. Against the code before this contract: one optimizer config was
shared by all networks, every trained network stepped on every micro-batch, and the output was "the first trained
network".

Randomness: `StepContext.generator` is seeded identically on every rank and every micro-batch of a step from
(seed, step) (deliberately not from micro_step, see below); phases after the first (or repetitions after the first)
use (seed, step, phase index, repetition), so they draw fresh numbers. Methods draw
per-sequence randomness for the whole *global* batch and slice their rows [global_offset, global_offset + B), so
a step's result does not depend on how the global batch is split over ranks and micro-batches
(`global_uniform`, `global_randint`, `global_normal`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol

import torch

__all__ = [
    "NetworkSpec",
    "StepContext",
    "StepOutput",
    "Method",
    "NetworkControl",
    "EvalStudent",
    "Phase",
    "global_uniform",
    "global_normal",
    "global_randint",
    "row_generators",
]


@dataclass(kw_only=True)
class NetworkSpec:
    """One network of a method.

    init: "config" (fresh DiT from the run's model config, seeded), "pretrained" (the run's `init_from`
    checkpoint), or "copy:<name>" (the weights of another network of this method at start).
    optim: overrides of the run's `optim` section for this trained network (module docstring).
    frozen_params: parameter-name prefixes of this trained network that are not trained.
    """

    role: Literal["trained", "frozen"]
    init: str = "config"
    model_overrides: dict = field(default_factory=dict)
    ema: bool = False
    optim: dict[str, Any] = field(default_factory=dict)
    frozen_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ("trained", "frozen"):
            raise ValueError(f"NetworkSpec.role={self.role!r}; allowed values: ['trained', 'frozen']")
        if not (self.init in ("config", "pretrained") or self.init.startswith("copy:")):
            raise ValueError(f"NetworkSpec.init={self.init!r}; allowed: 'config', 'pretrained', 'copy:<name>'")
        if self.ema and self.role != "trained":
            raise ValueError("NetworkSpec.ema=True needs role='trained'")
        if self.role != "trained" and (self.optim or self.frozen_params):
            raise ValueError("NetworkSpec.optim / frozen_params need role='trained' (a frozen network has no optimizer)")


@dataclass(frozen=True)
class Phase:
    """One ordered update phase of an optimizer step: `Method.step` runs `repeats` times over all micro-batches and
    the listed trained networks are updated after each repetition (module docstring)."""

    name: str
    networks: tuple[str, ...]
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.networks:
            raise ValueError(f"phase {self.name!r} updates no network")
        if self.repeats < 1:
            raise ValueError(f"phase {self.name!r}: repeats={self.repeats} must be >= 1")


@dataclass(kw_only=True)
class StepContext:
    """What the engine hands to `Method.step` for one micro-batch."""

    step: int  # optimizer step about to be taken (0-based)
    micro_step: int  # index of the micro-batch within the gradient accumulation
    global_offset: int  # index of this micro-batch's first sequence in the global batch
    global_batch_size: int
    generator: torch.Generator  # on `device`; the same state on all ranks and micro-batches of the step
    device: torch.device
    rank: int
    world_size: int
    phase: str = "step"  # the `Phase.name` being run
    phase_repeat: int = 0  # which repetition of that phase


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]  # one scalar per trained network, already normalised
    metrics: dict[str, float | torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class EvalStudent:
    """One model a run of a method produces, for the round eval (`eval/rounds.py`) and the demo.

    step: the training step whose checkpoint holds it (its EMA weights of `network`), or None for the run's final
    export. sampler: the sampler family that draws from it ("mdlm", "duo" or "dimo", in `diffusion/samplers.py`).
    trained_steps: the sampling steps it was distilled for, when the method knows them.
    """

    label: str
    step: int | None
    network: str
    sampler: Literal["mdlm", "duo", "dimo"]
    trained_steps: int | None = None


class NetworkControl(Protocol):
    """Implemented by the engine; lets a method change networks at a round boundary (collective: all ranks call)."""

    def copy_weights(self, dst: str, src: str, *, use_ema: bool = False) -> None: ...

    def reset_optimizer(self, name: str) -> None: ...


class Method(abc.ABC):
    """A training rule. Subclasses set `name`, `Config` and implement `networks` and `step`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    output_network: ClassVar[str] = "student"  # exported (EMA if any) and evaluated

    def __init__(self, cfg: Any, *, vocab_size: int, mask_id: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.mask_id = mask_id

    @abc.abstractmethod
    def networks(self) -> dict[str, NetworkSpec]:
        """Name -> spec, e.g. {"student": trained with EMA, "teacher": frozen}."""

    def phases(self) -> list[Phase]:
        """The ordered update phases of one optimizer step; default: one phase over every trained network."""
        trained = tuple(name for name, spec in self.networks().items() if spec.role == "trained")
        return [Phase(name="step", networks=trained)]

    @abc.abstractmethod
    def step(self, nets: Mapping[str, Callable], batch: torch.Tensor, ctx: StepContext) -> StepOutput:
        """Losses for one micro-batch `batch` (B, L) of clean token ids, in phase `ctx.phase`.

        `nets[name](x, sigma)` gives logits (B, L, V), `nets[name](x, sigma, rows=mask)` those of the positions
        selected by a (B, L) bool mask only, `nets[name].hidden_states(x, sigma)` the input of the output layer;
        extra keyword arguments go to the model's forward.
        """

    def on_step_end(self, step: int, control: NetworkControl) -> dict:
        """Called on every rank after optimizer step `step` was taken; returns metrics to log."""
        return {}

    def sampler_spec(self) -> dict:
        return {}

    def eval_students(self) -> list[EvalStudent]:
        """The students of a run of this method with this config, in the order they are trained (round 1, 2, ...).

        Evaluation and the demo ask this instead of reading any method's fields. Default: the exported network of
        the finished run, sampled as its process says."""
        sampler = "mdlm" if self.sampler_spec().get("process") == "absorbing" else "duo"
        return [EvalStudent(label=self.name, step=None, network=self.output_network, sampler=sampler)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state but the checkpoint holds {sorted(state)}")


def global_uniform(ctx: StepContext, num_rows: int, tail: tuple[int, ...]) -> torch.Tensor:
    """U[0,1) of shape (num_rows, *tail): rows [global_offset, global_offset+num_rows) of a global draw."""
    u = torch.rand((ctx.global_batch_size, *tail), generator=ctx.generator, device=ctx.device)
    return u[ctx.global_offset : ctx.global_offset + num_rows]


def global_randint(ctx: StepContext, high: int, num_rows: int, tail: tuple[int, ...]) -> torch.Tensor:
    """Uniform ids in [0, high) of shape (num_rows, *tail), sliced from a global draw like `global_uniform`."""
    ids = torch.randint(high, (ctx.global_batch_size, *tail), generator=ctx.generator, device=ctx.device)
    return ids[ctx.global_offset : ctx.global_offset + num_rows]


def row_generators(ctx: StepContext, num_rows: int) -> list[torch.Generator]:
    """One generator per sequence of the micro-batch, seeded from (a draw of the step generator, global row index):
    the same sequence gets the same draws however the global batch is split over ranks and micro-batches."""
    base = int(torch.randint(2**62, (), generator=ctx.generator, device=ctx.generator.device))
    return [
        torch.Generator(device=ctx.device).manual_seed((base * 1_000_003 + ctx.global_offset + r) % (2**63 - 1))
        for r in range(num_rows)
    ]


def global_normal(ctx: StepContext, num_rows: int, tail: tuple[int, ...]) -> torch.Tensor:
    """Standard normals of shape (num_rows, *tail), sliced from a global draw like `global_uniform`."""
    n = torch.randn((ctx.global_batch_size, *tail), generator=ctx.generator, device=ctx.device)
    return n[ctx.global_offset : ctx.global_offset + num_rows]


def fused_kernel(name: str, impl: str = "triton") -> Callable:
    """The fused loss `ddistill.kernels.<name>` for `method.loss_impl=triton|chunked`, or an error naming the fix."""
    try:
        import ddistill.kernels as kernels
    except ImportError as err:
        raise ValueError(
            f"method.loss_impl={impl!r} needs ddistill.kernels.{name}, which cannot be imported ({err}); "
            "use method.loss_impl=torch"
        ) from err
    return getattr(kernels, name)
