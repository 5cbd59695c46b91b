"""A method's networks as DeepSpeed engines.

* Trained network -> one ZeRO-2 (or 1) engine: torch Adam or AdamW client optimizer (DeepSpeed's config-driven
  "AdamW" is FusedAdam, a 73 s JIT on CPU; on CUDA torch's single-kernel fused=True variant, the same update to fp32
  rounding) over the parameters not excluded by `NetworkSpec.frozen_params` (those get requires_grad=False and never
  change), its own global-norm gradient clipping, gradient accumulation, learning rate set by the trainer before
  every step, optional fp32 EMA (see ema.py).
* Frozen network -> ZeRO-3 inference engine (no optimizer): parameters larger than the persistence threshold are
  partitioned over ranks (each holds ~1/N), optionally offloaded to CPU. Its forward is a collective: every rank
  must call it equally often. Always run under no_grad, eval mode. Two ways to gather (`deepspeed.frozen_gather`):
  "module" = DeepSpeed's own, module by module at every call (memory: the largest layers in flight); "micro_batch"
  = `Network.resident()`: the trainer gathers all partitions once per micro-batch with one coalesced all-gather
  (at the micro-batch's first lookup of the network, `GatherOnLookup`; a phase that never reads it never gathers it),
  and every call inside (an SDTT micro-batch calls its teacher k times) runs the plain module, without ZeRO-3's
  per-module fetch/release hooks (memory: one full copy of the network while the micro-batch runs).

Precision: the DeepSpeed engines hold fp32 weights. On CUDA with bf16 on, the DiT runs its own bf16 autocast
(`ModelConfig.autocast_dtype`), as the MDLM/DUO references (Lightning "bf16-mixed"). DeepSpeed's `bf16` section is
not used: it casts the weights to bf16 and the DiT's fp32 σ-embedding then fails on mixed dtypes (deepspeed.md §8).

`Network` is what methods receive as `nets[name]`: call it as `net(x, sigma, **model_kwargs) -> logits`, or use
`hidden_states`, `output_weight`, `output_bias` for the fused kernels. Both go through the engine's forward (hooks
stay intact); keyword arguments reach the DiT's forward.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ddistill.engine.ema import EMA
from ddistill.methods.base import NetworkSpec

__all__ = ["DiTEntry", "GatherOnLookup", "Network", "OPTIMIZERS", "trained_ds_config", "frozen_ds_config",
           "freeze_parameters", "build_trained", "build_frozen", "copy_into", "full_state", "gathered", "reset_optimizer_state"]


class DiTEntry(nn.Module):
    """Root module handed to DeepSpeed: one forward for logits or hidden states, so both pass the engine's hooks."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None, hidden: bool = False,
                rows: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        if hidden:
            return self.net.hidden_states(x, sigma, **model_kwargs)
        return self.net(x, sigma, rows, **model_kwargs)


def trained_ds_config(
    *, micro_batch_size: int, grad_accum: int, world_size: int, grad_clip: float, zero_stage: int, overlap_comm: bool,
    contiguous_gradients: bool
) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage, "overlap_comm": overlap_comm,
                              "contiguous_gradients": contiguous_gradients},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def frozen_ds_config(*, micro_batch_size: int, world_size: int, zero_stage: int, persistence_threshold: int,
                     cpu_offload: bool) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # DeepSpeed's default True replaces torch.nn.functional.linear for the whole PROCESS ("persists unless
        # manually reset") with an autograd.Function that re-materialises weights: the trained student's every
        # linear then ran through it (matmul + separate bias add, Python backward), 13% of an SDTT step on an H200.
        # An inference-only network gains nothing from it.
        zero["memory_efficient_linear"] = False
        zero["stage3_param_persistence_threshold"] = persistence_threshold
        if cpu_offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


@dataclass
class Network:
    name: str
    spec: NetworkSpec
    engine: object  # deepspeed.DeepSpeedEngine
    ema: EMA | None = None
    _resident: bool = False  # inside `resident()`: all parameters gathered, forwards bypass the ZeRO-3 hooks

    @property
    def trained(self) -> bool:
        return self.spec.role == "trained"

    @property
    def module(self) -> nn.Module:
        """The DiT inside the engine (for ZeRO-3 its parameters are partitioned: gather before reading)."""
        return self.engine.module.net

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.module.padded_vocab_size

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """Logits (B, L, V), or (num_selected, V) for the positions selected by the bool mask `rows`."""
        if self.trained:
            return self.engine(x, sigma, rows=rows, **model_kwargs)
        with torch.no_grad():
            return self._frozen_forward(x, sigma, rows=rows, **model_kwargs)

    def hidden_states(self, x: torch.Tensor, sigma: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        if self.trained:
            return self.engine(x, sigma, hidden=True, **model_kwargs)
        with torch.no_grad():
            return self._frozen_forward(x, sigma, hidden=True, **model_kwargs)

    def _frozen_forward(self, *args, **kwargs) -> torch.Tensor:
        # Resident: the parameters are all there and the hooks are suspended, so the module runs as a plain one
        # (the engine's forward adds nothing for an inference-only network: no optimizer, no output hooks).
        return self.engine.module(*args, **kwargs) if self._resident else self.engine(*args, **kwargs)

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Frozen ZeRO-3 network: all partitioned parameters gathered by ONE coalesced all-gather on entry and
        re-partitioned on exit; in between, forwards skip ZeRO-3's per-module hooks (no fetch, release, trace or
        stream synchronisation per layer). A collective: every rank must enter. A no-op for trained, replicated
        or already resident networks."""
        if self.trained or self._resident or not _is_partitioned(self.module):
            yield
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        root = self.engine.module
        missing = [p for p in root.parameters() if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        persistent = [p for p in missing if p.ds_persist]
        if persistent:  # gathered for good, as DeepSpeed's own first fetch of a persistent parameter does
            persistent[0].all_gather(param_list=persistent)
        with gathered([p for p in missing if not p.ds_persist]):
            modules = list(root.modules())
            hooks = [(m._forward_pre_hooks, m._forward_hooks) for m in modules]
            for module in modules:  # the handles keep pointing at the saved dicts, which are put back below
                module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
            self._resident = True
            try:
                yield
            finally:
                self._resident = False
                for module, (pre, post) in zip(modules, hooks):
                    module._forward_pre_hooks, module._forward_hooks = pre, post

    def head_dtype(self, device: torch.device) -> torch.dtype:
        return self.module.head_dtype(device)

    @property
    def output_weight(self) -> torch.Tensor:
        self._require_replicated("output_weight")
        return self.module.output_weight

    @property
    def output_bias(self) -> torch.Tensor:
        self._require_replicated("output_bias")
        return self.module.output_bias

    def _require_replicated(self, what: str) -> None:
        if not self.trained and not self._resident and _is_partitioned(self.module):
            raise RuntimeError(
                f"{self.name}.{what}: the frozen network's parameters are ZeRO-3 partitioned; use "
                f"`with {self.name}.gathered_output() as (weight, bias):` to read them"
            )

    @contextlib.contextmanager
    def gathered_output(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The full output weight and bias (a collective under ZeRO-3: every rank must enter)."""
        if self._resident:
            yield self.module.output_weight, self.module.output_bias
            return
        layer = self.module.output_layer.linear
        with gathered(list(layer.parameters())):
            yield self.module.output_weight, self.module.output_bias


class GatherOnLookup(Mapping[str, Network]):
    """The networks by name, as a method sees them for one micro-batch: a network's `resident()` context (a no-op
    but for frozen ZeRO-3 networks) is entered on ``stack`` at its first lookup, so a network that is never looked
    up is never gathered."""

    def __init__(self, nets: Mapping[str, Network], stack: contextlib.ExitStack):
        self._nets, self._stack, self._entered = nets, stack, set()

    def __getitem__(self, name: str) -> Network:
        net = self._nets[name]
        if name not in self._entered:
            self._entered.add(name)
            self._stack.enter_context(net.resident())
        return net

    def __iter__(self) -> Iterator[str]:
        return iter(self._nets)

    def __len__(self) -> int:
        return len(self._nets)


def _is_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """deepspeed.zero.GatheredParameters for partitioned params; a no-op for plain ones."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def freeze_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """requires_grad=False for every parameter whose name starts with one of `prefixes`; returns their names (an
    error names a prefix that matches nothing, so a typo cannot silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in names):
            raise ValueError(f"frozen_params prefix {prefix!r} matches no parameter of the model")
    frozen = []
    for pname, param in model.named_parameters():
        if any(pname.startswith(prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen.append(pname)
    return frozen


def build_trained(name: str, spec: NetworkSpec, model: nn.Module, *, ds_config: dict, algorithm: str, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float, ema_decay: float | None,
                  fused_optimizer: bool = False) -> Network:
    import deepspeed

    if algorithm not in OPTIMIZERS:
        raise ValueError(f"optimizer algorithm {algorithm!r}; allowed values: {sorted(OPTIMIZERS)}")
    freeze_parameters(model, tuple(spec.frozen_params))
    entry = DiTEntry(model)
    trainable = [p for p in entry.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[algorithm](trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      fused=fused_optimizer or None)
    engine, *_ = deepspeed.initialize(model=entry, optimizer=optimizer, config=ds_config)
    engine.train()  # returns None (deepspeed.md P2): never chain
    _remove_redundant_syncs(engine.optimizer)
    ema = EMA(engine.module.net, ema_decay) if spec.ema else None
    return Network(name=name, spec=spec, engine=engine, ema=ema)


def _mask_nonfinite_norm_(norm: torch.Tensor, device=None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace` (a NaN/inf norm becomes the -1 "invalid" sentinel) without its
    `torch.tensor(-1.0, device=...)`: a copy from pageable host memory, which synchronises the stream."""
    norm.masked_fill_(~torch.isfinite(norm), val)


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm) -> None:
    """DeepSpeed ZeRO-1/2's `unscale_and_clip_grads` (bound to one optimizer) with its invalid-norm guard on the
    device: an invalid norm (NaN, inf or the negative sentinel) clips with an infinite norm, as DeepSpeed's does,
    but through `torch.where` instead of a Python `if` on the tensor (a host sync on every step; `step()` has
    already skipped a step whose norm is invalid, so the guard never fires on that path). Same operations on the
    same values otherwise: bitwise the same gradients."""
    if not torch.is_tensor(total_norm):
        return type(self).unscale_and_clip_grads(self, grad_groups_flat, total_norm)
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return None
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        clip_norm = torch.where(~torch.isfinite(total_norm) | (total_norm < 0), float("inf"), total_norm)
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        combined_scale = torch.clamp(clip, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)
    return None


def _grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed ZeRO-1/2's `get_grad_norm_direct` (bound to one optimizer) for the L2 norm, with the per-gradient
    norms taken in one multi-tensor call, `torch._foreach_norm(grads, 2, dtype=<DeepSpeed's norm dtype, float64>)`.
    DeepSpeed's loop copies every gradient to float64 (a tensor the size of the gradient) and launches one
    `vector_norm` per gradient: ~130 host-side iterations a step for a DiT, during which the GPU waits. The selection
    of gradients (padding, pipeline replicas, model-parallel ranks), the sum of squares, the all-reduces, the root and
    the -1 sentinel are DeepSpeed's. The same norms bit for bit on CPU (the multi-tensor norm's fallback is the same
    per-tensor norm); on CUDA its fused kernel may sum in another order (float64 rounding of each gradient's norm)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0:
        return type(self).get_grad_norm_direct(self, gradients, params, norm_type)
    grads = [g.data for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params)
             if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
             and (is_model_parallel_parameter(p) or self.model_parallel_rank == 0)]
    if grads:
        total_norm = torch.stack(torch._foreach_norm(grads, 2.0, dtype=get_norm_dtype())).pow(2.0).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1.0 / 2.0)
    stage_1_and_2.mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def _remove_redundant_syncs(zero_optimizer) -> None:
    """Take two of the three host syncs and the per-gradient norm loop out of DeepSpeed's ZeRO-1/2 `step()` (the
    sync that remains decides on the host whether a non-finite norm skips the step). The clip and the norm are bound
    to this optimizer; the norm masking replaces the name in DeepSpeed's `stage_1_and_2` module, so every ZeRO-1/2
    optimizer of the process uses it. The replacements compute the same values (the norm: see `_grad_norm_direct`):
    tests/test_perf.py::test_sync_free_zero_step_matches_deepspeed."""
    from deepspeed.runtime.zero import stage_1_and_2

    if not isinstance(zero_optimizer, stage_1_and_2.DeepSpeedZeroOptimizer):
        return
    if getattr(stage_1_and_2, "mask_nan_or_inf_with_val_inplace", None) is not None:
        stage_1_and_2.mask_nan_or_inf_with_val_inplace = _mask_nonfinite_norm_
    zero_optimizer.unscale_and_clip_grads = _unscale_and_clip_grads.__get__(zero_optimizer)
    zero_optimizer.get_grad_norm_direct = _grad_norm_direct.__get__(zero_optimizer)


def build_frozen(name: str, spec: NetworkSpec, model: nn.Module, *, ds_config: dict) -> Network:
    import deepspeed

    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=DiTEntry(model), config=ds_config)
    engine.eval()
    return Network(name=name, spec=spec, engine=engine)


@torch.no_grad()
def copy_into(dst: Network, source: dict[str, torch.Tensor]) -> None:
    """Overwrite dst's weights with `source` (full tensors by parameter name, identical on every rank).

    Frozen ZeRO-3 dst: gather one parameter at a time (bounded memory), rank 0 writes, DeepSpeed re-partitions on
    exit. Trained ZeRO-2 dst: write the replicated module weights, then refresh the optimizer's fp32 partitions.
    """
    params = dict(dst.module.named_parameters())
    if set(params) != set(source):
        raise ValueError(
            f"cannot copy weights into {dst.name!r}: missing {sorted(set(params) - set(source))}, "
            f"unexpected {sorted(set(source) - set(params))}"
        )
    for pname, param in params.items():
        with gathered([param], modifier_rank=0):
            if param.shape != source[pname].shape:
                raise ValueError(f"{dst.name}.{pname}: shape {tuple(param.shape)} != {tuple(source[pname].shape)}")
            param.copy_(source[pname].to(device=param.device, dtype=param.dtype))
    if dst.trained:
        optimizer = dst.engine.optimizer
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
        if dst.ema is not None:
            dst.ema.reset_to(dst.module)


@torch.no_grad()
def full_state(net: Network, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32/param-dtype tensors by name, on CPU, identical on every rank (a collective for ZeRO-3)."""
    if use_ema:
        if net.ema is None:
            raise ValueError(f"network {net.name!r} has no EMA (NetworkSpec.ema=False)")
        return {n: t.detach().cpu().clone() for n, t in net.ema.shadow.items()}
    out = {}
    for pname, param in net.module.named_parameters():
        with gathered([param]):
            out[pname] = param.detach().cpu().clone()
    return out


def reset_optimizer_state(net: Network) -> None:
    """Zero AdamW's moments and step counts in place (the state structure stays, so checkpoints keep working)."""
    if not net.trained:
        raise ValueError(f"network {net.name!r} is frozen and has no optimizer")
    inner = getattr(net.engine.optimizer, "optimizer", net.engine.optimizer)
    for state in inner.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
