"""The typed configuration of one training run, composed of every component's config.

YAML layout (see configs/experiments/*.yaml)::

    model:     ModelConfig (ddistill.models.dit)          data: DataConfig (ddistill.data)
    method:    {name: <registered method>, ...its Config fields}
    optim:     OptimConfig        train: TrainConfig        deepspeed: DeepSpeedConfig
    logging:   LoggingConfig      init_from: checkpoint path or null
    networks:  {<trained network of the method>: {optim: {...OptimConfig overrides}}}

Each trained network's optimizer is `RunConfig.network_optim(name, spec)`: the `optim` section, overridden by the
method's `NetworkSpec.optim`, overridden by `networks.<name>.optim` (e.g. `networks.aux.optim.lr=1e-5`).

`load_run_config(path, overrides)` merges `base:` files, applies dotted `key=value` overrides and validates:
unknown keys and bad values raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from ddistill.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ddistill.data.corpora import DataConfig
from ddistill.data.tokenizer import tokenizer_spec
from ddistill.methods import available_methods, get_method
from ddistill.models.dit import ModelConfig, resolve_model_config

__all__ = [
    "OptimConfig",
    "TrainConfig",
    "DeepSpeedConfig",
    "LoggingConfig",
    "MethodSection",
    "NetworkSection",
    "RunConfig",
    "load_run_config",
    "run_config_from_dict",
    "config_sections",
]


@dataclass(kw_only=True)
class OptimConfig:
    """torch AdamW (or Adam) + LR schedule: linear warm-up from 0 to `lr` over `warmup_steps`, then constant or cosine
    to `min_lr` at train.max_steps. `grad_clip` <= 0 disables clipping (global L2 norm over all ranks)."""

    algorithm: Literal["adamw", "adam"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 2500
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must lie in [0, optim.lr]")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int
    global_batch_size: int
    micro_batch_size: int
    seed: int = 0
    out_dir: str
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0 = no periodic validation loss
    eval_batches: int = 8
    max_consecutive_nonfinite: int = 20
    ema_decay: float = 0.9999
    device: Literal["auto", "cuda", "cpu"] = "auto"
    stop_after_steps: int | None = None  # test/preemption hook: checkpoint and stop once this step count is reached
    export_final: bool = True  # write the EMA student in the public HF layout at the end
    # One launch only (engine/relaunch.py; recorded as false): resume although settings other than the safe ones
    # changed, or start from step 0 over a run in out_dir that has no usable checkpoint.
    allow_config_change: bool = False
    restart_from_scratch: bool = False
    # Regional torch.compile of every network's DiT blocks (models.dit.DiT.compile_blocks); the losses (fused Triton
    # kernels included) stay eager. Dropout then draws from Inductor's RNG, so losses differ from eager's.
    compile: bool = False

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "ckpt_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must lie in [0, 1)")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError(f"train.max_consecutive_nonfinite={self.max_consecutive_nonfinite} must be >= 1")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """bf16: "auto" = bf16 mixed precision on CUDA (fp32 master weights in the engine, the DiT's own bf16 autocast),
    fp32 on CPU. Trained networks use ZeRO `trained_zero_stage` (1 or 2); frozen networks ZeRO-3 inference
    (`frozen_zero_stage` 3, or 0 = replicated) with parameters above `frozen_persistence_threshold` elements
    partitioned, optionally offloaded to CPU. `contiguous_gradients` (DeepSpeed's ZeRO-1/2 flag): copy each gradient
    into one preallocated buffer from its backward hook (less fragmentation) instead of keeping the gradients apart
    until the reduction flattens them (the same numbers either way); off by default: on one H200 the copies'
    per-parameter launches kept the host behind the GPU (`small` MDLM step 80.9 -> 76.0 ms without them, in one
    process: benchmarks/results/engine_ab.md)."""

    bf16: bool | Literal["auto"] = "auto"
    trained_zero_stage: Literal[1, 2] = 2
    frozen_zero_stage: Literal[0, 3] = 3
    frozen_cpu_offload: bool = False
    frozen_persistence_threshold: int = 10_000
    frozen_gather: Literal["micro_batch", "module"] = "micro_batch"
    timeout_minutes: float = 30.0
    overlap_comm: bool = False
    contiguous_gradients: bool = False


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "ddistill"
    run_name: str | None = None
    jsonl: bool = True
    progress_bar: bool = True


@dataclass(kw_only=True)
class MethodSection:
    name: str
    config: Any  # the registered method's Config dataclass


@dataclass(kw_only=True)
class NetworkSection:
    """Per-network settings from YAML: `optim` overrides (keys of OptimConfig) for one trained network."""

    optim: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    method: MethodSection
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: str | None = None
    init_from_ema: bool = False  # load the checkpoint's EMA weights (True) or raw weights (False)
    networks: dict[str, NetworkSection] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["method"] = {"name": self.method.name, **to_dict(self.method.config)}
        return out

    def network_optim(self, name: str, spec_optim: Mapping[str, Any]) -> OptimConfig:
        """The optimizer config of trained network `name`: `optim` < the method's `NetworkSpec.optim` <
        `networks.<name>.optim`."""
        section = self.networks.get(name, NetworkSection())
        merged = {**to_dict(self.optim), **dict(spec_optim), **section.optim}
        try:
            return from_dict(OptimConfig, merged, f"networks.{name}.optim")
        except ConfigError as err:  # name the network: its values may come from three places
            raise ConfigError(f"networks.{name}.optim: {err} (keys not set under networks.{name}.optim come from the "
                              f"method's defaults, then from optim.*)") from None


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "deepspeed": DeepSpeedConfig,
    "logging": LoggingConfig,
}
_TOP_LEVEL = set(_SECTIONS) | {"method", "init_from", "init_from_ema", "networks"}


def config_sections() -> str:
    """One line per config section with its keys (for `ddistill train --help`)."""
    lines = []
    for key, cls in _SECTIONS.items():
        lines.append(f"  {key}: {', '.join(f.name for f in dataclasses.fields(cls))}")
    lines.insert(2, f"  method: name ({', '.join(available_methods())}) and that method's own keys")
    lines.append("  networks: <trained network>.optim.<optim key> overrides the method's optimizer defaults per network "
                 "(e.g. networks.aux.optim.lr=1e-5)")
    lines.append("  init_from: public-layout checkpoint (HF dir, Lightning .ckpt, hub id) of the init='pretrained' "
                 "networks")
    lines.append("  init_from_ema: load that checkpoint's EMA weights (Lightning .ckpt)")
    return "\n".join(lines)


def run_config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; allowed keys: {sorted(_TOP_LEVEL)}")
    for required in ("method", "train"):
        if required not in data:
            raise ConfigError(f"missing required config section {required!r}")
    sections: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        value = data.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section, got {value!r}")
        sections[key] = from_dict(cls, value, key)
    try:
        sections["model"] = resolve_model_config(sections["model"])
    except ValueError as err:
        raise ConfigError(str(err) if "model." in str(err) else f"model: {err}") from err
    try:
        tokenizer_spec(sections["data"].tokenizer)  # a bad name fails here; the vocabulary check is the trainer's
    except ValueError as err:
        raise ConfigError(f"data.tokenizer: {err}") from err
    method = dict(data["method"]) if isinstance(data["method"], Mapping) else None
    if method is None or "name" not in method:
        raise ConfigError(f"method.name is required; available methods: {available_methods()}")
    name = method.pop("name")
    try:
        method_cls = get_method(name)
    except ValueError as err:
        raise ConfigError(f"method.name: {err}") from err
    method_cfg = from_dict(method_cls.Config, method, "method")
    init_from = data.get("init_from")
    if init_from is not None and not isinstance(init_from, str):
        raise ConfigError(f"init_from: expected a path string or null, got {init_from!r}")
    init_from_ema = data.get("init_from_ema", False)
    if not isinstance(init_from_ema, bool):
        raise ConfigError(f"init_from_ema: expected true or false, got {init_from_ema!r}")
    networks = data.get("networks") or {}
    if not isinstance(networks, Mapping):
        raise ConfigError(f"networks: expected a section of network names, got {networks!r}")
    for key, value in networks.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"networks.{key}: expected a section such as {{optim: {{lr: 1e-5}}}}, got {value!r}")
    networks = {str(k): from_dict(NetworkSection, v, f"networks.{k}") for k, v in networks.items()}
    cfg = RunConfig(method=MethodSection(name=name, config=method_cfg), init_from=init_from,
                    init_from_ema=init_from_ema, networks=networks, **sections)
    _check_networks(cfg, method_cls)
    return cfg


def _check_networks(cfg: RunConfig, method_cls) -> None:
    """`networks.<name>` names a trained network of the method, and every trained network's optimizer is valid."""
    try:
        specs = method_cls(cfg.method.config, vocab_size=cfg.model.vocab_size,
                           mask_id=cfg.model.vocab_size - 1).networks()
    except ValueError as err:
        raise ConfigError(f"method: {err}") from err
    trained = sorted(n for n, spec in specs.items() if spec.role == "trained")
    for name in cfg.networks:
        if name not in trained:
            raise ConfigError(f"networks.{name}: method {cfg.method.name!r} has no trained network {name!r}; "
                              f"its trained networks: {trained}")
    for name in trained:
        cfg.network_optim(name, specs[name].optim)


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (with `base:` merging; None = start empty) + dotted overrides -> validated RunConfig."""
    data = load_yaml(path) if path is not None else {}
    return run_config_from_dict(apply_overrides(data, list(overrides)))
