"""DeepSpeed training engine: distributed init, ZeRO-2 trained / ZeRO-3 frozen networks, EMA, checkpoints, loop.

Entry points: `run_training(cfg) -> summary`, `train_main(argv)` (the `ddistill train` command),
`load_run_config(path, overrides)`. Run `python -m ddistill.engine CONFIG.yaml key=value ...` under any launcher.
"""

from ddistill.engine.run_config import RunConfig, load_run_config, run_config_from_dict
from ddistill.engine.trainer import Trainer, run_training, train_main

__all__ = ["RunConfig", "load_run_config", "run_config_from_dict", "Trainer", "run_training", "train_main"]
