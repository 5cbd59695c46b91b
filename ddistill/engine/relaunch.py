"""What a launch finds in its `train.out_dir`, and which config changes a resume accepts.

A launch into out_dir is one of (`plan_launch`, run on rank 0 before any network is built or file written):

    new       out_dir is absent or empty (or holds a run that never logged a step nor wrote a checkpoint)
    resume    out_dir holds a ddistill run with a valid checkpoint: the newest valid one is loaded, and the new
              resolved config is compared with the checkpoint's `config.yaml`, key by dotted key
    restart   a ddistill run whose checkpoint directories are all empty or damaged, or that logged steps without
              writing one: started over from step 0 only with `train.restart_from_scratch=true`
    refused   files that are not a ddistill run (no `config.yaml` of a run config beside them), a run without a
              usable checkpoint (without the flag above), or a resume with refused or unflagged changes

A config change on resume is (`change_kind`):

    safe      how the rest of the run is driven or observed (max_steps, checkpoint/log/eval cadence, logging,
              export, the NCCL timeout, how a frozen ZeRO-3 network is gathered and whether gradients go through
              one contiguous buffer (same numbers both); init_from, which a resume does not read): accepted and
              printed
    refused   the architecture (model.size and the fields it resolves to, vocab, length, time conditioning,
              causal), the data, the method's name, the ZeRO stage of the trained engines: the checkpoint cannot
              continue under them; a new out_dir is the way
    flagged   everything else (optimizer, LR schedule, method fields, seed, batch sizes, precision, EMA decay, ...):
              accepted only with `train.allow_config_change=true`, and printed

Every accepted change is appended to `out_dir/config_history.yaml` (step, checkpoint, time, each key's old and new
value and kind) before `config.yaml` is overwritten with the new config. `train.allow_config_change` and
`train.restart_from_scratch` hold for one launch: they are never compared and are recorded as false.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from ddistill.config import ConfigError
from ddistill.engine import checkpoint as ckpt

__all__ = ["ConfigChange", "LaunchPlan", "change_kind", "compare_configs", "plan_launch", "recorded_config",
           "append_history", "is_run_config", "HISTORY", "ONE_SHOT_FLAGS"]

HISTORY = "config_history.yaml"
ONE_SHOT_FLAGS = ("train.allow_config_change", "train.restart_from_scratch")
_NOT_COMPARED = {"train.out_dir", *ONE_SHOT_FLAGS}
_SAFE = {"train.max_steps", "train.ckpt_every", "train.keep_last", "train.log_every", "train.eval_every",
         "train.eval_batches", "train.stop_after_steps", "train.export_final", "train.max_consecutive_nonfinite",
         "deepspeed.timeout_minutes", "deepspeed.frozen_gather", "deepspeed.contiguous_gradients", "init_from",
         "init_from_ema",
         "data.cache_dir", "data.datasets_cache_dir", "data.num_proc"}  # where data is cached / how fast it is read
_SAFE_SECTIONS = ("logging.",)
_ARCHITECTURE = {f"model.{k}" for k in ("size", "hidden_size", "n_blocks", "n_heads", "cond_dim", "length",
                                        "vocab_size", "time_conditioning", "causal", "pad_vocab_multiple")}
_REFUSED = _ARCHITECTURE | {"method.name", "deepspeed.trained_zero_stage"}
_REFUSED_SECTIONS = ("data.",)

Kind = Literal["safe", "refused", "flagged"]


def change_kind(key: str) -> Kind:
    """How a resume treats a change of the dotted config key `key` (module docstring)."""
    if key in _SAFE or key.startswith(_SAFE_SECTIONS):
        return "safe"
    if key in _REFUSED or key.startswith(_REFUSED_SECTIONS):
        return "refused"
    return "flagged"


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any
    kind: Kind

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


_ABSENT = "<absent>"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _normalised(data: Mapping[str, Any]) -> dict[str, Any]:
    """The YAML round trip every recorded config went through (tuples -> lists, ...), then dotted keys."""
    return _flatten(yaml.safe_load(yaml.safe_dump(dict(data), sort_keys=False)) or {})


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[ConfigChange]:
    """Every dotted key whose value differs between two resolved configs (a key on one side only counts too)."""
    a, b = _normalised(old), _normalised(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in _NOT_COMPARED]
    return [ConfigChange(k, a.get(k, _ABSENT), b.get(k, _ABSENT), change_kind(k))
            for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def recorded_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as written to config.yaml: the one-shot flags recorded as false."""
    out = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=False))
    for key in ONE_SHOT_FLAGS:
        section, name = key.split(".")
        if name in out.get(section, {}):
            out[section][name] = False
    return out


def is_run_config(data: Any) -> bool:
    """Whether parsed YAML looks like a config.yaml written by a ddistill run (method.name, train.max_steps)."""
    return (isinstance(data, Mapping) and isinstance(data.get("method"), Mapping) and "name" in data["method"]
            and isinstance(data.get("train"), Mapping) and "max_steps" in data["train"])


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


@dataclass
class LaunchPlan:
    """What `Trainer` does with out_dir: resume from `checkpoint` (None: start at step 0)."""

    checkpoint: str | None = None
    damaged: list[str] = field(default_factory=list)
    changes: list[ConfigChange] = field(default_factory=list)
    restart: bool = False  # starting over an existing run (train.restart_from_scratch=true)

    def messages(self) -> list[str]:
        lines = [f"damaged checkpoint skipped: {problem}" for problem in self.damaged]
        if self.restart:
            lines.append("train.restart_from_scratch=true: starting over from step 0 (no usable checkpoint)")
        safe = [str(c) for c in self.changes if c.kind == "safe"]
        flagged = [str(c) for c in self.changes if c.kind == "flagged"]
        if safe:
            lines.append("resuming with changed settings (safe on resume): " + "; ".join(safe))
        if flagged:
            lines.append("resuming with changed settings (train.allow_config_change=true): " + "; ".join(flagged))
        return lines


def _has_progress(out_dir: Path) -> bool:
    metrics = out_dir / "metrics.jsonl"
    return bool(ckpt.list_checkpoints(out_dir / "checkpoints")) or (metrics.is_file() and metrics.stat().st_size > 0)


def plan_launch(out_dir: str | Path, new_config: Mapping[str, Any], *, allow_config_change: bool,
                restart_from_scratch: bool) -> LaunchPlan:
    """Inspect out_dir (module docstring); raise ConfigError naming the problem, having changed nothing."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir={out_dir} is a file, not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return LaunchPlan()
    checkpoints = ckpt.list_checkpoints(out_dir / "checkpoints")
    run_config = _read_yaml(out_dir / "config.yaml") if (out_dir / "config.yaml").is_file() else None
    if not is_run_config(run_config) and not checkpoints:
        what = ("its config.yaml is not the config of a ddistill run" if (out_dir / "config.yaml").exists()
                else "it has no config.yaml of a ddistill run")
        raise ConfigError(f"train.out_dir={out_dir} holds files but no ddistill run ({what}); refusing to write "
                          "into it: choose a new or empty train.out_dir")
    path, damaged = ckpt.find_latest_valid(out_dir / "checkpoints")
    if path is None:
        if not _has_progress(out_dir):
            return LaunchPlan()
        reason = (f"all {len(checkpoints)} checkpoint directories are empty or damaged ({'; '.join(damaged)})"
                  if checkpoints else "it logged steps but wrote no checkpoint")
        if not restart_from_scratch:
            raise ConfigError(f"train.out_dir={out_dir} holds a ddistill run that cannot be resumed: {reason}. "
                              "Starting from step 0 would overwrite its config.yaml and metrics.jsonl; pass "
                              "train.restart_from_scratch=true to start over, or choose a new train.out_dir")
        return LaunchPlan(damaged=damaged, restart=True)
    if restart_from_scratch:
        raise ConfigError(f"train.restart_from_scratch=true but train.out_dir={out_dir} holds a valid checkpoint "
                          f"({path.name}), from which this launch would resume; to start over choose a new "
                          "train.out_dir")
    old_config = _read_yaml(path / "config.yaml")
    if not is_run_config(old_config):
        raise ConfigError(f"checkpoint {path} has no readable config.yaml of a ddistill run; cannot check that "
                          "this config may continue it")
    changes = compare_configs(old_config, new_config)
    refused = [str(c) for c in changes if c.kind == "refused"]
    flagged = [str(c) for c in changes if c.kind == "flagged"]
    where = f"train.out_dir={out_dir} holds a run at {path.name}"
    if refused:
        also = f" (also changed: {'; '.join(flagged)})" if flagged else ""
        raise ConfigError(f"{where} that cannot continue with a different architecture, data or method: "
                          f"{'; '.join(refused)}{also}. Use a new train.out_dir for a different run")
    if flagged and not allow_config_change:
        raise ConfigError(f"{where}; resuming it with changed settings needs train.allow_config_change=true: "
                          f"{'; '.join(flagged)} (or use a new train.out_dir)")
    return LaunchPlan(checkpoint=str(path), damaged=damaged, changes=changes)


def append_history(out_dir: Path, plan: LaunchPlan, step: int) -> None:
    """Record the accepted changes of a resume (or a restart) in out_dir/config_history.yaml, atomically."""
    if not plan.changes and not plan.restart:
        return
    path = Path(out_dir) / HISTORY
    entries = _read_yaml(path) if path.is_file() else []
    entries = entries if isinstance(entries, list) else []
    entries.append({
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "checkpoint": Path(plan.checkpoint).name if plan.checkpoint else None,
        "restart_from_scratch": plan.restart,
        "changes": {c.key: {"from": c.old, "to": c.new, "kind": c.kind} for c in plan.changes},
    })
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(yaml.safe_dump(entries, sort_keys=False))
    os.replace(tmp, path)
