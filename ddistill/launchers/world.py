"""The world size a launch will have, and what the run config needs of it (checked before anything starts).

One optimizer step takes `train.global_batch_size` rows as `grad_accum` micro-batches of `train.micro_batch_size`
on each of `world_size` ranks, so global = micro x world_size x grad_accum must hold with an integer grad_accum
(engine/trainer.py). The engine checks it too, but only once the job runs; a launcher checks it first so that no
job is queued only to fail in its log.
"""

from __future__ import annotations

from ddistill.config import ConfigError

__all__ = ["check_world_size"]


def check_world_size(train_cfg, world_size: int, *, layout: str) -> int:
    """Return grad_accum for `world_size` ranks; ConfigError naming the numbers and the layout otherwise."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size} ({layout}) must be >= 1")
    per_pass = train_cfg.micro_batch_size * world_size
    if train_cfg.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={train_cfg.global_batch_size} is not divisible by train.micro_batch_size="
            f"{train_cfg.micro_batch_size} x world size {world_size} ({layout}); choose a global batch that is a "
            f"multiple of {per_pass}")
    return train_cfg.global_batch_size // per_pass
