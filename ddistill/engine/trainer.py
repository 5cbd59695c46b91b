"""The training loop: one `Trainer` for every method of the registry, on any number of ranks.

    python -m ddistill.engine CONFIG.yaml key=value ...                         # 1 process (CPU or 1 GPU)
    torchrun --standalone --nproc_per_node 2 -m ddistill.engine CONFIG.yaml ... # 2 ranks (NCCL on GPU, gloo on CPU)

One optimizer step = `grad_accum` micro-batches per rank, grad_accum = global_batch / (micro_batch · world_size),
for each of the method's update phases in order (`Method.phases()`, each repeated `Phase.repeats` times; one phase
over every trained network by default): a phase repetition runs the method on every micro-batch, back-propagates
the losses it returned and steps exactly those networks, so the next phase sees their updated weights.
Micro-batch k of rank r holds rows [(k·W + r)·B, (k·W + r + 1)·B) of the step's global batch; the method's
randomness comes from a generator seeded from (seed, step) — (seed, step, phase, repetition) after the first
phase repetition — identical on all ranks and micro-batches (methods draw for the whole global batch and slice
their rows, so results do not depend on the split), and the global torch RNG (dropout) is reseeded from
(seed, step, k, rank[, phase, repetition]) before each micro-batch. Nothing depends on the RNG history, so a
resumed run repeats the uninterrupted one bit for bit (on CPU; cuDNN/atomics may differ on GPU).

Every trained network has its own optimizer config (`RunConfig.network_optim`: algorithm, LR schedule, clipping).

Agreement: after each micro-batch's forward, the ranks all-reduce (error, non-finite loss). An error anywhere
raises on every rank (with the failing rank's message where it happened); a non-finite loss anywhere makes every
rank back-propagate NaN, so DeepSpeed's ZeRO step (its NaN/inf global gradient norm) skips it on all ranks consistently —
no parameter, moment or EMA update. `train.max_consecutive_nonfinite` skipped steps in a row stop the run with a
checkpoint of the last good state. A preemption signal (SIGUSR2 from SLURM/submitit, SIGTERM) sets a flag that is
all-reduced at the next step boundary and read one step later (`LaggedAnyRank`: no host sync a step); all ranks then
checkpoint and return with `summary["preempted"] = True`.
`ddistill train` exits with `ddistill.exit_codes.exit_code_for_stop(summary["stop_reason"])`.

Launching: `engine.relaunch.plan_launch` inspects train.out_dir first (new run, resume, restart, or a refusal that
changes nothing). A resume builds every network from the run's config and loads the checkpoint: `init_from` is
read only by a run that starts at step 0. Logged metrics are global: losses and method metrics are averaged over
ranks, token counts summed (one all-reduce per step, on the device). They are read on the host only when a log
line, a checkpoint or the caller of `train_step` needs them, so the host queues step n+1 while the device still runs
step n (`train_step_deferred`, `StepMetrics`); tokens/s is the window's wall time up to that read. The windowed `loss` is the mean over the window's applied
steps, carried across a resume in the checkpoint, and absent (with `skipped_in_window`) when every step of the
window was skipped. A frozen network is gathered and written only at the first checkpoint after it changed; the
next checkpoints hard-link (or copy) that file, so every checkpoint directory stays complete on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from ddistill.config import ConfigError, dump_yaml
from ddistill.engine import checkpoint as ckpt
from ddistill.engine import relaunch
from ddistill.engine.distributed import (
    DistEnv,
    LaggedAnyRank,
    all_reduce_max_,
    all_reduce_sum,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from ddistill.engine.networks import (
    GatherOnLookup,
    Network,
    build_frozen,
    build_trained,
    copy_into,
    frozen_ds_config,
    full_state,
    gathered,
    reset_optimizer_state,
    trained_ds_config,
)
from ddistill.engine.observe import MetricsLogger, peak_memory_gib, truncate_metrics
from ddistill.engine.run_config import RunConfig, load_run_config
from ddistill.exit_codes import ExitCode, exit_code_for_stop
from ddistill.methods import Phase, StepContext, get_method

__all__ = ["Trainer", "run_training", "train_main", "train_command", "RankFailure", "derive_seed", "lr_at"]

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# Handlers that were installed before ours (e.g. submitit's requeue handler); launchers.slurm hands them the signal
# once every rank has checkpointed.
PREVIOUS_HANDLERS: dict[int, Any] = {}
# What an `init_from` checkpoint must agree on with the run's model config (the public layout records them).
INIT_ARCHITECTURE = ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length", "vocab_size", "time_conditioning",
                     "causal")
# Run settings that are not in the public layout: a pretrained network takes the run's.
INIT_RUN_SETTINGS = ("dropout", "attn_backend", "autocast_dtype", "pad_vocab_multiple", "block_kernels")


class _Sums:
    """Per-step sums of losses and metrics over micro-batches and phases, each with its count; values may be float64
    device tensors, read once at the end of the step."""

    def __init__(self) -> None:
        self.loss: dict[str, float | torch.Tensor] = {}
        self.loss_count: dict[str, int] = {}
        self.metrics: dict[str, float | torch.Tensor] = {}
        self.metric_count: dict[str, int] = {}
        self.grad_norms: dict[str, float | torch.Tensor] = {}
        self.tokens = 0
        self.applied_nonfinite: list[tuple[bool, torch.Tensor]] = []  # (skipped, agreed non-finite) per update

    def add_loss(self, name: str, value: float | torch.Tensor) -> None:
        self.loss[name] = self.loss.get(name, 0.0) + value
        self.loss_count[name] = self.loss_count.get(name, 0) + 1

    def add_metric(self, key: str, value: float | torch.Tensor) -> None:
        self.metrics[key] = self.metrics.get(key, 0.0) + value
        self.metric_count[key] = self.metric_count.get(key, 0) + 1


class _WindowClock:
    """Wall time of the training steps of a log window, without a host sync per step: `run()` at the top of each
    step (starts the clock if it is stopped), `pause()` before work that is not training (waits for the queued
    device work, then stops), `take()` returns the time and resets."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.elapsed, self.started = device, 0.0, None

    def run(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def pause(self) -> None:
        if self.started is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed += time.perf_counter() - self.started
            self.started = None

    def take(self) -> float:
        self.pause()
        elapsed, self.elapsed = self.elapsed, 0.0
        return elapsed


class StepMetrics:
    """One optimizer step's metrics, read from the device only by `resolve()` (one device-to-host copy).

    `skipped` (DeepSpeed skipped the update: a non-finite loss or gradient) is known on the host at once; the
    losses, method metrics, token count, gradient norms and the agreed non-finite flags are not."""

    def __init__(self, *, skipped: bool, world_size: int, averaged: dict[str, int], summed: torch.Tensor,
                 per_rank_keys: tuple[str, ...], per_rank: torch.Tensor, skipped_per_update: tuple[bool, ...],
                 host: dict[str, Any]) -> None:
        self.skipped = skipped
        self._world_size, self._averaged, self._summed = world_size, averaged, summed
        self._per_rank_keys, self._per_rank = per_rank_keys, per_rank
        self._skipped_per_update, self._host = skipped_per_update, host
        self._resolved: dict[str, Any] | None = None

    def resolve(self) -> dict[str, Any]:
        """The metrics as Python numbers (the first call waits for the step's device work)."""
        if self._resolved is None:
            with record_function("ddistill.read_metrics"):
                values = torch.cat([self._summed, self._per_rank]).tolist()
            *totals, tokens = values[:len(self._summed)]
            per_rank = dict(zip(self._per_rank_keys, values[len(self._summed):]))
            for i, phase_skipped in enumerate(self._skipped_per_update):
                assert phase_skipped or not per_rank[f"_nonfinite{i}"], \
                    "a non-finite loss was agreed but DeepSpeed applied the step"
            ws = self._world_size
            metrics: dict[str, Any] = {k: v / (count * ws) for (k, count), v in zip(self._averaged.items(), totals)}
            metrics.update(tokens=int(tokens))
            metrics.update({k: v for k, v in per_rank.items() if not k.startswith("_nonfinite")})
            metrics.update(self._host)
            self._resolved = metrics
        return self._resolved


def _float64_vector(values: list[float | torch.Tensor], device: torch.device) -> torch.Tensor:
    """A float64 device vector of scalars that are device tensors or Python numbers, without a host-to-device copy
    (a copy from pageable host memory synchronises the stream; `torch.full` is a fill kernel)."""
    if not values:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([v.detach().to(torch.float64).reshape(()) if torch.is_tensor(v)
                        else torch.full((), float(v), dtype=torch.float64, device=device) for v in values])


class RankFailure(RuntimeError):
    """Raised on every rank when any rank failed during a step."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@torch.no_grad()
def _state_on_main(net: Network, is_main: bool) -> dict[str, torch.Tensor] | None:
    """A network's full weights on CPU on rank 0 only; a collective (one parameter gathered at a time)."""
    out: dict[str, torch.Tensor] | None = {} if is_main else None
    for pname, param in net.module.named_parameters():
        with gathered([param]):
            if out is not None:
                out[pname] = param.detach().cpu().clone()
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this filesystem (or across devices)
        import shutil

        shutil.copyfile(src, dst)


def lr_at(step: int, *, lr: float, warmup_steps: int, schedule: str, min_lr: float, max_steps: int) -> float:
    """Linear warm-up 0 -> lr over warmup_steps (step 0 uses lr/warmup), then constant or cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + np.cos(np.pi * progress))


class Trainer:
    """Builds the method's networks as DeepSpeed engines, runs steps, checkpoints, resumes, logs."""

    def __init__(self, cfg: RunConfig, *, train_blocks: Sequence | None = None,
                 valid_blocks: Sequence | None = None, dist_env: DistEnv | None = None):
        self.cfg = cfg
        if train_blocks is None:  # token blocks of the configured corpus: the model must fit its tokenizer
            from ddistill.data.tokenizer import check_vocab_size

            try:
                check_vocab_size(cfg.data.tokenizer, cfg.model.vocab_size, what="model.vocab_size")
            except ValueError as err:
                raise ConfigError(str(err)) from err
        self.dist = dist_env or init_distributed(timeout_minutes=cfg.deepspeed.timeout_minutes,
                                                 device=cfg.train.device)
        tc = cfg.train
        per_pass = tc.micro_batch_size * self.dist.world_size
        if tc.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size={tc.global_batch_size} is not divisible by train.micro_batch_size="
                f"{tc.micro_batch_size} x world_size={self.dist.world_size}"
            )
        self.grad_accum = tc.global_batch_size // per_pass
        self.device = self.dist.device
        self.bf16 = self.device.type == "cuda" if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)
        self.out_dir = Path(tc.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        vocab = cfg.model.vocab_size
        # The last id of the vocabulary is the absorbing [MASK] (GPT-2: 50257 = ddistill.data.tokenizer.MASK_ID).
        self.method = get_method(cfg.method.name)(cfg.method.config, vocab_size=vocab, mask_id=vocab - 1)
        self.optims = {}  # trained network -> its OptimConfig
        self.plan = self._plan_launch()
        self.nets = self._build_networks(resuming=self.plan.checkpoint is not None)
        self.trained = {n: net for n, net in self.nets.items() if net.trained}
        if not self.trained:
            raise ValueError(f"method {cfg.method.name!r} declares no trained network")
        self.output_name = self.method.output_network
        if self.output_name not in self.trained:
            raise ValueError(f"method {cfg.method.name!r}: output_network={self.output_name!r} is not one of its "
                             f"trained networks {sorted(self.trained)}")
        self.phases = self._check_phases(self.method.phases())
        self.updates = {name: 0 for name in self.trained}  # optimizer updates applied per network
        self.train_blocks = train_blocks if train_blocks is not None else self._blocks("train")
        self.valid_blocks = valid_blocks
        if self.valid_blocks is None and tc.eval_every > 0:
            self.valid_blocks = self._blocks("validation")
        from ddistill.data.loader import BlockLoader

        self.loader = BlockLoader(self.train_blocks, micro_batch_size=tc.micro_batch_size, rank=self.dist.rank,
                                  world_size=self.dist.world_size, seed=tc.seed)
        self.step = 0
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self.resumed_from: str | None = None
        self.damaged_checkpoints: list[str] = list(self.plan.damaged)
        # The logging window (this rank's view; losses are already global): applied steps' loss sum and counts.
        self.window = {"loss": 0.0, "steps": 0, "skipped": 0}
        # Per frozen network: the checkpoint file that holds its current weights (None: changed since written).
        self._frozen_file: dict[str, str | None] = {n: None for n, net in self.nets.items() if not net.trained}
        self._preempt = threading.Event()
        self.preempt_signal: str | None = None  # the first preemption signal this rank received (launchers.slurm)
        if self.plan.checkpoint is not None:
            self.load_checkpoint(Path(self.plan.checkpoint))

    # ------------------------------------------------------------------ construction
    def _plan_launch(self) -> relaunch.LaunchPlan:
        """Rank 0 inspects out_dir; every rank gets the plan, or raises the same ConfigError (nothing written)."""
        plan = error = None
        if self.dist.is_main:
            tc = self.cfg.train
            try:
                plan = relaunch.plan_launch(self.out_dir, self.cfg.to_dict(),
                                            allow_config_change=tc.allow_config_change,
                                            restart_from_scratch=tc.restart_from_scratch)
            except ConfigError as err:
                error = str(err)
        plan, error = broadcast_object((plan, error))
        if error is not None:
            raise ConfigError(error)
        return plan

    def _blocks(self, split: str):
        from ddistill.data.packing import build_token_blocks

        if self.dist.is_main:  # tokenise once; the other ranks then read the cache
            blocks = build_token_blocks(self.cfg.data, split)
        barrier()
        return blocks if self.dist.is_main else build_token_blocks(self.cfg.data, split)

    def _model_cfg(self, overrides: dict):
        import dataclasses

        from ddistill.models.dit import resolve_model_config

        fields = {"autocast_dtype": "bfloat16" if self.bf16 else "float32", **overrides}
        try:
            return resolve_model_config(dataclasses.replace(self.cfg.model, **fields))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model overrides {overrides} of method {self.cfg.method.name!r}: {err}") from err

    def _initial_module(self, name: str, spec, built: dict, resuming: bool):
        from ddistill.models.dit import build_model

        if spec.init == "config" or (spec.init == "pretrained" and resuming):  # a resume loads the checkpoint's
            torch.manual_seed(derive_seed(self.cfg.train.seed, 0xC0F16, sorted(self.method.networks()).index(name)))
            return build_model(self._model_cfg(spec.model_overrides))
        if spec.init == "pretrained":
            return self._pretrained_module(name, spec)
        source = spec.init.removeprefix("copy:")
        if source not in built:
            raise ValueError(f"network {name!r}: init={spec.init!r} but {source!r} is not a network built before it")
        import copy

        model = copy.deepcopy(built[source])
        model_cfg = self._model_cfg(spec.model_overrides)
        if model_cfg != model.config:
            fresh = type(model)(model_cfg)
            fresh.load_state_dict(model.state_dict(), strict=True)
            model = fresh
        return model

    def _pretrained_module(self, name: str, spec) -> torch.nn.Module:
        """The init_from checkpoint, refused unless its architecture is the run's (so config.yaml and the export
        record what runs); the run's dropout / attention / precision settings apply to it."""
        if not self.cfg.init_from:
            raise ConfigError(f"network {name!r} has init='pretrained' but init_from is not set")
        from ddistill.models.checkpoints import checkpoint_tokenizer, load_pretrained

        trained_with = checkpoint_tokenizer(self.cfg.init_from)
        if trained_with != self.cfg.data.tokenizer:
            raise ConfigError(f"init_from={self.cfg.init_from} was trained with tokenizer {trained_with!r} but "
                              f"data.tokenizer={self.cfg.data.tokenizer!r}; set data.tokenizer={trained_with} "
                              f"(and model.vocab_size to match)")
        expected = self._model_cfg(spec.model_overrides)
        overrides = {**{k: getattr(expected, k) for k in INIT_RUN_SETTINGS}, **spec.model_overrides}
        try:
            model, loaded = load_pretrained(self.cfg.init_from, use_ema=self.cfg.init_from_ema, overrides=overrides)
        except (OSError, ValueError) as err:  # missing path, unreachable hub id, a file that is not a checkpoint
            raise ConfigError(f"init_from={self.cfg.init_from}: {err}") from err
        wrong = [f"model.{k}={getattr(expected, k)!r} (checkpoint: {getattr(loaded, k)!r})"
                 for k in INIT_ARCHITECTURE if getattr(expected, k) != getattr(loaded, k)]
        if wrong:
            raise ConfigError(f"init_from={self.cfg.init_from}: the checkpoint's architecture disagrees with the run's "
                              f"model config (model.size={self.cfg.model.size!r} and the keys set): "
                              f"{'; '.join(wrong)}. Set these model.* keys to the checkpoint's values")
        return model

    def _build_networks(self, resuming: bool) -> dict[str, Network]:
        specs = self.method.networks()
        order = sorted(specs, key=lambda n: specs[n].init.startswith("copy:"))
        modules: dict[str, torch.nn.Module] = {}
        for name in order:
            modules[name] = self._initial_module(name, specs[name], modules, resuming)
        tc, ds = self.cfg.train, self.cfg.deepspeed
        if tc.compile:  # regional: the DiT blocks only; ZeRO-3's per-module hooks would split a frozen net's graphs
            hooked = ds.frozen_zero_stage == 3 and ds.frozen_gather == "module"
            for name, model in modules.items():
                if not (specs[name].role == "frozen" and hooked):
                    model.compile_blocks()
        nets: dict[str, Network] = {}
        for name in sorted(specs, key=lambda n: specs[n].role != "frozen"):  # frozen engines first
            spec, model = specs[name], modules[name]
            if spec.role == "frozen":
                conf = frozen_ds_config(micro_batch_size=tc.micro_batch_size, world_size=self.dist.world_size,
                                        zero_stage=ds.frozen_zero_stage,
                                        persistence_threshold=ds.frozen_persistence_threshold,
                                        cpu_offload=ds.frozen_cpu_offload)
                nets[name] = build_frozen(name, spec, model, ds_config=conf)
            else:
                oc = self.optims[name] = self.cfg.network_optim(name, spec.optim)
                conf = trained_ds_config(micro_batch_size=tc.micro_batch_size, grad_accum=self.grad_accum,
                                         world_size=self.dist.world_size, grad_clip=oc.grad_clip,
                                         zero_stage=ds.trained_zero_stage, overlap_comm=ds.overlap_comm,
                                         contiguous_gradients=ds.contiguous_gradients)
                net = build_trained(name, spec, model, ds_config=conf, algorithm=oc.algorithm, lr=oc.lr,
                                    betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay,
                                    ema_decay=tc.ema_decay, fused_optimizer=self.device.type == "cuda")
                # Skipping a step on non-finite gradients must not depend on clipping: ZeRO-1/2 with fp32 weights
                # computes the global gradient norm on every step (compute_grad_norm, clipping or not) and skips the
                # step when it is NaN/inf. Its per-tensor overflow check (check_grad_overflow) would find the same
                # thing with ~7 kernel launches per parameter tensor (a third of a small model's step), so stays off.
                if not getattr(net.engine.optimizer, "compute_grad_norm", True):
                    raise RuntimeError(f"network {name!r}: DeepSpeed's ZeRO optimizer does not compute the gradient "
                                       "norm, so steps with non-finite gradients would not be skipped")
                nets[name] = net
        return nets

    def _check_phases(self, phases: list[Phase]) -> list[Phase]:
        if not phases:
            raise ValueError(f"method {self.cfg.method.name!r} declares no update phase")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.cfg.method.name!r}: duplicate phase names {names}")
        for phase in phases:
            unknown = sorted(set(phase.networks) - set(self.trained))
            if unknown:
                raise ValueError(f"method {self.cfg.method.name!r}: phase {phase.name!r} updates {unknown}, which "
                                 f"are not trained networks {sorted(self.trained)}")
        return list(phases)

    # ------------------------------------------------------------------ NetworkControl
    def copy_weights(self, dst: str, src: str, *, use_ema: bool = False) -> None:
        """dst <- src (raw or EMA weights); collective, call on every rank."""
        copy_into(self.nets[dst], full_state(self.nets[src], use_ema=use_ema))
        if dst in self._frozen_file:
            self._frozen_file[dst] = None  # to be written at the next checkpoint

    def reset_optimizer(self, name: str) -> None:
        reset_optimizer_state(self.nets[name])

    # ------------------------------------------------------------------ one step
    def _seed_micro(self, step: int, micro: int, phase_key: tuple[int, ...] = ()) -> None:
        seed = derive_seed(self.cfg.train.seed, step, micro, self.dist.rank, *phase_key)
        torch.manual_seed(seed)  # also seeds every CUDA device
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _set_lr(self) -> dict[str, float]:
        """Every trained network's learning rate at this step, from its own optimizer config."""
        lrs = {}
        for name, net in self.trained.items():
            oc = self.optims[name]
            lr = lrs[name] = lr_at(self.step, lr=oc.lr, warmup_steps=oc.warmup_steps, schedule=oc.schedule,
                                   min_lr=oc.min_lr, max_steps=self.cfg.train.max_steps)
            inner = getattr(net.engine.optimizer, "optimizer", net.engine.optimizer)
            for group in inner.param_groups:
                group["lr"] = lr
        return lrs

    def _agree(self, error: BaseException | None, local_bad: torch.Tensor | None) -> torch.Tensor:
        """Raise on every rank if any rank failed; return the device flag "some rank's loss is non-finite".

        One rank: nothing to agree on, so the flag stays on the device (no host sync before the backward). Several
        ranks: the error flag must reach the host before anyone issues the backward's collectives, so the two flags
        travel in one all-reduce and the error flag is read (one sync per micro-batch)."""
        bad = local_bad if local_bad is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        if self.dist.world_size == 1:
            if error is not None:
                raise error
            return bad
        flags = torch.stack([torch.tensor(float(error is not None), dtype=torch.float64, device=self.device),
                             bad.to(torch.float64)])
        all_reduce_max_(flags)
        if bool(flags[0]):
            if error is not None:
                raise error
            raise RankFailure(f"another rank failed during step {self.step} (see its log); stopping all ranks")
        return flags[1] > 0

    @contextlib.contextmanager
    def _micro_batch_nets(self) -> Iterator[Mapping[str, Network]]:
        """The networks as the method sees them for one micro-batch. With deepspeed.frozen_gather=micro_batch a
        frozen ZeRO-3 network is gathered once (networks.Network.resident) at its first lookup and re-partitioned
        when the micro-batch ends, so a phase that never reads it (DiMO's aux phase and its teacher) pays no
        all-gather (and no host sync). The gather is a collective: a method looks a frozen network up on every rank
        or on none, as it calls its forward."""
        with contextlib.ExitStack() as stack:
            yield GatherOnLookup(self.nets, stack) if self.cfg.deepspeed.frozen_gather == "micro_batch" else self.nets

    def train_step(self, micro_batches: Sequence[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over this rank's `grad_accum` micro-batches, phase by phase; returns global metrics
        (losses and method metrics averaged over ranks, micro-batches and phase repeats, `tokens` summed over ranks)
        as Python numbers: `train_step_deferred(...).resolve()`."""
        return self.train_step_deferred(micro_batches).resolve()

    def train_step_deferred(self, micro_batches: Sequence[torch.Tensor]) -> "StepMetrics":
        """`train_step` without reading its metrics: they stay on the device until `StepMetrics.resolve()`, so the
        host can queue the next step while this one runs (`fit` resolves a log window's steps together).

        Losses and metrics are summed on the device in float64 (the same sums as Python floats of the fp32 values);
        across ranks they are summed by one all-reduce on the device, which does not wait for the host."""
        assert len(micro_batches) == self.grad_accum, (len(micro_batches), self.grad_accum)
        lrs = self._set_lr()
        sums = _Sums()
        skipped = False
        for index, phase in enumerate(self.phases):
            for repeat in range(phase.repeats):
                skipped |= self._run_phase(micro_batches, index, phase, repeat, sums)
        self.step += 1
        local = {**{f"loss/{n}": v for n, v in sums.loss.items()}, **sums.metrics}
        counts = {**{f"loss/{n}": c for n, c in sums.loss_count.items()}, **sums.metric_count}
        keys = sorted(local)  # the same keys and counts on every rank: one all-reduce for all of them
        summed = _float64_vector([local[k] for k in keys] + [sums.tokens], self.device)
        all_reduce_sum_(summed)
        per_rank = {**sums.grad_norms, **{f"_nonfinite{i}": agreed for i, (_, agreed) in
                                          enumerate(sums.applied_nonfinite)}}  # fmt: skip
        host: dict[str, Any] = dict(lr=lrs[self.output_name], skipped=float(skipped))
        if len(self.trained) > 1:
            host.update({f"lr/{n}": lr for n, lr in lrs.items()})
        host.update(self.method.on_step_end(self.step - 1, self))
        return StepMetrics(skipped=skipped, world_size=self.dist.world_size,
                           averaged={k: counts[k] for k in keys}, summed=summed,
                           per_rank_keys=tuple(per_rank), per_rank=_float64_vector(list(per_rank.values()), self.device),
                           skipped_per_update=tuple(s for s, _ in sums.applied_nonfinite), host=host)

    @staticmethod
    def _phase_key(index: int, repeat: int) -> tuple[int, ...]:
        """Extra seed parts of a phase repetition: none for the first (so single-phase methods keep their draws)."""
        return () if (index, repeat) == (0, 0) else (index, repeat)

    def _run_phase(self, micro_batches: Sequence[torch.Tensor], index: int, phase: Phase, repeat: int,
                   sums: _Sums) -> bool:
        """One repetition of one phase over all micro-batches; returns whether its update was skipped."""
        tc, ws, rank = self.cfg.train, self.dist.world_size, self.dist.rank
        phase_key = self._phase_key(index, repeat)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        updated: tuple[str, ...] | None = None
        for micro, batch in enumerate(micro_batches):
            self._seed_micro(self.step, micro, phase_key)
            generator = torch.Generator(device=self.device)  # same state on every rank AND micro-batch of the step
            generator.manual_seed(derive_seed(tc.seed, self.step, *phase_key))
            ctx = StepContext(step=self.step, micro_step=micro, global_offset=(micro * ws + rank) * tc.micro_batch_size,
                              global_batch_size=tc.global_batch_size, generator=generator, device=self.device,
                              rank=rank, world_size=ws, phase=phase.name, phase_repeat=repeat)
            error, local_bad, out = None, None, None
            try:
                with self._micro_batch_nets() as nets, record_function(f"ddistill.{phase.name}.method_step"):
                    out = self.method.step(nets, batch.to(self.device, non_blocking=True), ctx)
                names = self._phase_losses(phase, out.losses, updated)
                updated = names
                if names:
                    local_bad = torch.stack([~torch.isfinite(out.losses[n].detach()) for n in names]).any()
            except Exception as err:  # agreed below, then re-raised on every rank
                error = err
            nonfinite = nonfinite | self._agree(error, local_bad)
            # NaN gradients make ZeRO's overflow check skip the step on every rank (module docstring); × 1.0 (a finite
            # step) leaves the loss and its gradients bit for bit unchanged.
            scale = torch.where(nonfinite, float("nan"), 1.0).to(torch.float32)
            for name in updated:
                loss = out.losses[name]
                with record_function(f"ddistill.{name}.backward"):
                    self.nets[name].engine.backward(loss * scale.to(loss.dtype))
                sums.add_loss(name, loss.detach().to(torch.float64))
            for key, value in out.metrics.items():
                sums.add_metric(key, value.detach().to(torch.float64) if torch.is_tensor(value) else float(value))
            sums.tokens += out.num_tokens
            for name in updated:
                with record_function(f"ddistill.{name}.optimizer_step"):
                    self.nets[name].engine.step()
        if not updated:
            return False
        applied = [self.nets[n].engine.was_step_applied() for n in updated]
        assert len(set(applied)) == 1, f"networks disagree on whether the step was applied: {applied}"
        skipped = not applied[0]
        sums.applied_nonfinite.append((skipped, nonfinite))  # checked once per step (no host sync here)
        for name in updated:
            net = self.nets[name]
            if not skipped:
                self.updates[name] += 1
                if net.ema is not None:
                    with record_function(f"ddistill.{name}.ema"):
                        net.ema.update(net.module)
                norm = net.engine.get_global_grad_norm()
                if norm is not None:
                    sums.grad_norms[f"grad_norm/{name}"] = norm
        return skipped

    def _phase_losses(self, phase: Phase, losses: dict, before: tuple[str, ...] | None) -> tuple[str, ...]:
        """The networks (in phase order) that get a loss on this micro-batch; the same set on every micro-batch."""
        unexpected = sorted(set(losses) - set(phase.networks))
        if unexpected:
            raise ValueError(f"method {self.cfg.method.name!r} returned losses for {unexpected} in phase "
                             f"{phase.name!r}, which updates {list(phase.networks)}")
        names = tuple(n for n in phase.networks if n in losses)
        if before is not None and names != before:
            raise ValueError(f"method {self.cfg.method.name!r}, phase {phase.name!r}: losses for {list(names)} on one "
                             f"micro-batch and {list(before)} on another; the set must not depend on the data")
        return names

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from ddistill.data.loader import BlockLoader

        tc, ws, rank = self.cfg.train, self.dist.world_size, self.dist.rank
        loader = BlockLoader(self.valid_blocks, micro_batch_size=tc.micro_batch_size, rank=rank, world_size=ws,
                             seed=tc.seed)
        for net in self.trained.values():
            net.engine.eval()
        sums: dict[str, float] = {}
        for i in range(tc.eval_batches):
            batch = next(loader).to(self.device)
            for index, phase in enumerate(self.phases):  # each phase once: the loss of every network it updates
                key = self._phase_key(index, 0)
                generator = torch.Generator(device=self.device)
                generator.manual_seed(derive_seed(tc.seed, 0xE7A1, i, *key))
                torch.manual_seed(derive_seed(tc.seed, 0xE7A1, i, rank, *key))
                ctx = StepContext(step=self.step, micro_step=i, global_offset=rank * tc.micro_batch_size,
                                  global_batch_size=tc.micro_batch_size * ws, generator=generator,
                                  device=self.device, rank=rank, world_size=ws, phase=phase.name)
                with self._micro_batch_nets() as nets:
                    out = self.method.step(nets, batch, ctx)
                for name, loss in out.losses.items():
                    sums[f"val/loss/{name}"] = sums.get(f"val/loss/{name}", 0.0) + float(loss)
        for net in self.trained.values():
            net.engine.train()
        keys = sorted(sums)
        totals = all_reduce_sum([sums[k] for k in keys], self.device)
        return {k: v / (tc.eval_batches * ws) for k, v in zip(keys, totals)}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Collective: every rank writes its part; rank 0 finalises (manifest last, atomic rename) and prunes."""
        final = ckpt.checkpoint_dir(self.ckpt_root, self.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            (tmp / "ema").mkdir(parents=True)
            (tmp / "frozen").mkdir()
        barrier()
        for name, net in self.trained.items():
            net.engine.save_checkpoint(str(tmp / "ds" / name), tag="state", save_latest=False)
        # A frozen network unchanged since a checkpoint that still exists is linked from it, not gathered again.
        unchanged = None
        if self.dist.is_main:
            unchanged = {n: f for n, f in self._frozen_file.items() if f is not None and Path(f).is_file()}
        unchanged = broadcast_object(unchanged)
        frozen = {name: _state_on_main(net, self.dist.is_main)  # collective
                  for name, net in self.nets.items() if not net.trained and name not in unchanged}
        rank_state = {
            "loader": self.loader.state_dict(),
            "window": dict(self.window),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }
        torch.save(rank_state, tmp / f"rank_{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            for name, state in frozen.items():
                torch.save(state, tmp / "frozen" / f"{name}.pt")
            for name, source in unchanged.items():
                _link_or_copy(Path(source), tmp / "frozen" / f"{name}.pt")
            for name, net in self.trained.items():
                if net.ema is not None:
                    torch.save(net.ema.state_dict(), tmp / "ema" / f"{name}.pt")
            torch.save({"step": self.step, "consecutive_nonfinite": self.consecutive_nonfinite,
                        "total_nonfinite": self.total_nonfinite, "world_size": self.dist.world_size,
                        "updates": dict(self.updates), "method": self.method.state_dict()}, tmp / "trainer.pt")
            dump_yaml(relaunch.recorded_config(self.cfg.to_dict()), tmp / "config.yaml")
        barrier()
        if self.dist.is_main:
            ckpt.finalize(tmp, final, self.step)
            ckpt.prune(self.ckpt_root, self.cfg.train.keep_last)
        barrier()
        self._frozen_file = {name: str(final / "frozen" / f"{name}.pt") for name in self._frozen_file}
        return final

    def load_checkpoint(self, path: Path) -> None:
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        if trainer_state["world_size"] != self.dist.world_size:
            raise ConfigError(f"checkpoint {path.name} was written with world_size={trainer_state['world_size']}; "
                              f"this run has {self.dist.world_size} (ZeRO partitions depend on it)")
        for name, net in self.trained.items():
            load_path, _ = net.engine.load_checkpoint(str(path / "ds" / name), tag="state",
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
            if load_path is None:
                raise ckpt.CorruptCheckpointError(f"{path.name}: DeepSpeed could not load network {name!r}")
            if net.ema is not None:
                net.ema.load_state_dict(torch.load(path / "ema" / f"{name}.pt", map_location=self.device))
        for name, net in self.nets.items():
            if not net.trained:
                copy_into(net, torch.load(path / "frozen" / f"{name}.pt", map_location="cpu"))
                self._frozen_file[name] = str(path / "frozen" / f"{name}.pt")
        rank_state = torch.load(path / f"rank_{self.dist.rank:05d}.pt", map_location="cpu", weights_only=False)
        self.loader.load_state_dict(rank_state["loader"])
        self.window = dict(rank_state.get("window", {"loss": 0.0, "steps": 0, "skipped": 0}))
        rng = rank_state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.method.load_state_dict(trainer_state["method"])
        self.step = int(trainer_state["step"])
        self.consecutive_nonfinite = int(trainer_state["consecutive_nonfinite"])
        self.total_nonfinite = int(trainer_state["total_nonfinite"])
        updates = trainer_state.get("updates")  # absent in checkpoints written before per-network counters
        if updates is not None:
            if set(updates) != set(self.updates):
                raise ValueError(f"checkpoint {path.name} holds update counters of {sorted(updates)}; this run "
                                 f"trains {sorted(self.updates)}")
            self.updates = {name: int(updates[name]) for name in self.updates}
        self.resumed_from = str(path)

    def export(self, out: Path | None = None) -> Path:
        """Rank 0 writes the EMA (else raw) weights of the method's output network in the public HF layout."""
        from ddistill.models.checkpoints import save_pretrained

        name = self.output_name
        net = self.trained[name]
        state = full_state(net, use_ema=net.ema is not None)
        out = out or self.out_dir / "export" / name
        if self.dist.is_main:
            import copy

            model = copy.deepcopy(net.module).cpu().float()
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    param.copy_(state[pname])
            # a uniform-state model is a DUO checkpoint; masked ones (MDLM, SDTT, the DiMO generator) are MDLM's
            flavor = "duo" if self.method.sampler_spec().get("process") == "uniform" else "mdlm"
            save_pretrained(model, out, flavor=flavor, tokenizer=self.cfg.data.tokenizer)
        barrier()
        return out

    # ------------------------------------------------------------------ loop
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum, frame):
            self.preempt_signal = self.preempt_signal or signal.Signals(signum).name
            self._preempt.set()

        for sig in PREEMPT_SIGNALS:
            PREVIOUS_HANDLERS[sig] = signal.signal(sig, on_signal)

    def fit(self) -> dict[str, Any]:
        tc, lc = self.cfg.train, self.cfg.logging
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # The steps after the checkpoint are run again: their records go (all records, on a fresh start).
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
            relaunch.append_history(self.out_dir, self.plan, self.step)
            dump_yaml(relaunch.recorded_config(self.cfg.to_dict()), self.out_dir / "config.yaml")
        logger = MetricsLogger(out_dir=self.out_dir, enabled=self.dist.is_main, jsonl=lc.jsonl, wandb_mode=lc.wandb,
                               project=lc.project, run_name=lc.run_name, config=self.cfg.to_dict(),
                               total_steps=tc.max_steps, start_step=self.step, progress_bar=lc.progress_bar)
        for line in self.plan.messages():
            logger.message(line)
        if self.resumed_from:
            logger.message(f"resumed from {self.resumed_from} at step {self.step}")
        self._install_signal_handlers()
        start_step, stop_reason, last = self.step, "max_steps", {}
        clock = _WindowClock(self.device)
        agree_preempt = LaggedAnyRank(self.device)  # several ranks: acted on one step after the signal
        logged: list[StepMetrics] = []  # the steps since the last log line, their metrics read only when needed
        unfolded: list[StepMetrics] = []  # ... of which not yet in the carried window sums

        def fold() -> None:  # the carried window sums, before a log line or a checkpoint (which saves them)
            clock.pause()  # the device work queued so far is the window's; what follows is not
            self._fold_window(unfolded)
            unfolded.clear()

        def checkpoint() -> None:
            fold()
            self.save_checkpoint()

        tokens_per_s = 0.0
        try:
            while self.step < tc.max_steps:
                clock.run()
                pending = self.train_step_deferred([next(self.loader) for _ in range(self.grad_accum)])
                logged.append(pending)
                unfolded.append(pending)
                self.total_nonfinite += pending.skipped
                self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if pending.skipped else 0
                preempt = agree_preempt(self._preempt.is_set())
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    fold()
                    tokens = sum(m.resolve()["tokens"] for m in logged)
                    tokens_per_s = tokens / self.dist.world_size / max(clock.take(), 1e-9)
                    last = {**logged[-1].resolve(), "skipped_in_window": self.window["skipped"],
                            "tokens_per_s_per_rank": tokens_per_s, "peak_mem_gib": peak_memory_gib(self.device),
                            "nonfinite_total": self.total_nonfinite}
                    if self.window["steps"]:  # a window of skipped steps has no loss
                        last["loss"] = self.window["loss"] / self.window["steps"]
                    logger.log(self.step, last)
                    logger.progress(self.step, last.get("loss"), tokens_per_s)
                    logged.clear()
                    self.window = {"loss": 0.0, "steps": 0, "skipped": 0}
                if tc.eval_every and self.step % tc.eval_every == 0 and self.valid_blocks is not None:
                    clock.pause()
                    val = self.evaluate()
                    logger.log(self.step, val)
                    last.update(val)
                if self.consecutive_nonfinite >= tc.max_consecutive_nonfinite:
                    stop_reason = "nonfinite"
                    logger.message(
                        f"stopping: {self.consecutive_nonfinite} consecutive steps with a non-finite loss or "
                        f"gradient (last at step {self.step - 1}); checkpointing the last good state (the skipped "
                        f"steps changed nothing). {nonfinite_advice(self.cfg)}")
                    checkpoint()
                    break
                if preempt:
                    stop_reason = "preempted"
                    logger.message(f"preemption signal: checkpointing at step {self.step} and stopping")
                    checkpoint()
                    break
                if self.step % tc.ckpt_every == 0 or self.step == tc.max_steps:
                    checkpoint()
                if tc.stop_after_steps is not None and self.step >= tc.stop_after_steps and self.step < tc.max_steps:
                    stop_reason = "stop_after_steps"
                    if self.step % tc.ckpt_every:
                        checkpoint()
                    break
            export = None
            if stop_reason == "max_steps" and tc.export_final:
                export = str(self.export())
            peaks = self._gather_peaks()
        finally:
            logger.close()
        latest = ckpt.list_checkpoints(self.ckpt_root)
        return {
            "start_step": start_step,
            "step": self.step,
            "stop_reason": stop_reason,
            "preempted": stop_reason == "preempted",
            "preempt_signal": self.preempt_signal,
            "resumed_from": self.resumed_from,
            "damaged_checkpoints": self.damaged_checkpoints,
            "nonfinite_total": self.total_nonfinite,
            "last_metrics": {k: (float(v) if torch.is_tensor(v) else v) for k, v in last.items()},
            "tokens_per_s_per_rank": tokens_per_s,
            "peak_mem_gib_per_rank": peaks,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "grad_accum": self.grad_accum,
            "latest_checkpoint": str(latest[-1][1]) if latest else None,
            "export": export,
        }

    def _fold_window(self, steps: Sequence[StepMetrics]) -> None:
        """Add `steps` to the carried log-window sums: the main loss over applied steps, the skipped count."""
        for m in steps:
            main_loss = m.resolve().get(f"loss/{self.output_name}")
            if m.skipped:
                self.window["skipped"] += 1
            elif main_loss is not None:
                self.window["loss"] += main_loss
                self.window["steps"] += 1

    def _gather_peaks(self) -> list[float]:
        values = [0.0] * self.dist.world_size
        values[self.dist.rank] = peak_memory_gib(self.device)
        return all_reduce_sum(values, self.device)


def nonfinite_advice(cfg: RunConfig) -> str:
    """What to try after a stop on non-finite losses, given the run's settings."""
    oc = cfg.optim
    clip = (f"clip harder (optim.grad_clip below {oc.grad_clip:g})" if oc.grad_clip > 0
            else "turn gradient clipping on (e.g. optim.grad_clip=1.0; it is off)")
    warmup = f"a longer warm-up (optim.warmup_steps, now {oc.warmup_steps})"
    return f"Try a lower optim.lr (now {oc.lr:g}), {warmup}, or {clip}; and check the data."


def run_training(cfg: RunConfig, *, train_blocks: Sequence | None = None,
                 valid_blocks: Sequence | None = None) -> dict[str, Any]:
    """Initialise distributed, train to completion/preemption/stop, tear down; returns the summary dict."""
    ok = False
    try:
        trainer = Trainer(cfg, train_blocks=train_blocks, valid_blocks=valid_blocks)
        summary = trainer.fit()
        ok = True
        return summary
    finally:
        if ok:
            shutdown_distributed()  # barrier + destroy back to back (deepspeed.md P5)
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: a peer may be gone


def train_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`ddistill train CONFIG.yaml key=value ...` (ignores the `--local_rank=N` the deepspeed launcher appends)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        print(train_usage(), file=sys.stdout if args else sys.stderr)
        raise SystemExit(ExitCode.FINISHED if args else ExitCode.BAD_INPUT)
    logging.basicConfig(level=os.environ.get("DDISTILL_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_run_config(args[0], args[1:])
    summary = run_training(cfg)
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        import json

        print("SUMMARY " + json.dumps(summary), flush=True)
    return summary


def train_command(argv: Sequence[str] | None = None) -> int:
    """`train_main` as a command: the exit code of `ddistill.exit_codes` (bad input: one line on stderr, 2)."""
    try:
        summary = train_main(argv)
    except ConfigError as err:  # the same message on every rank (the launch plan is rank 0's, broadcast)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ddistill train: configuration error: {err}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    return exit_code_for_stop(summary["stop_reason"])


def train_usage() -> str:
    from ddistill.engine.run_config import config_sections

    return f"""usage: ddistill train CONFIG.yaml [dotted.key=value ...]

Train (or distil) with the method named by method.name, on this process or under any launcher (torchrun,
deepspeed, srun; `ddistill submit` builds those commands).

CONFIG.yaml is a run config (configs/experiments/*.yaml; a `base:` key merges other files underneath). Each
key=value after it overrides one dotted key, its value read as YAML: train.max_steps=2000 optim.lr=3e-4
method.steps_per_round=[100,200] init_from=null. Unknown keys and bad values are errors naming the key.

train.out_dir holds the run: config.yaml (the resolved config), metrics.jsonl, checkpoints/step_*/ and export/.
Launching the same command again resumes from the newest valid checkpoint there (bit for bit on CPU). A resume accepts
changes of max_steps, checkpoint/log/eval cadence and logging (printed); it refuses a different architecture, data
or method; any other change needs train.allow_config_change=true and is recorded in config_history.yaml. An
out_dir with files that are not a ddistill run is refused; a run without a usable checkpoint is started over only
with train.restart_from_scratch=true. init_from (a public-layout checkpoint) is read only at step 0 and must have
the run's architecture.

Exit codes: 0 finished (or stopped at train.stop_after_steps), 1 unexpected error, 2 bad config or input,
3 stopped on non-finite losses, 75 preempted (checkpointed; relaunch to resume).

Config sections and their keys:
{config_sections()}"""
