"""Test-session settings: offline hubs, CPU-friendly DeepSpeed and Triton, deterministic torch."""

import os

# Hub look-ups fail at once instead of after ~30-50 s of DNS retries (reference/data.md).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment is set)

if not torch.cuda.is_available():
    # Triton kernels run through the interpreter on CPU; it must be set before any kernel is decorated.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

torch.use_deterministic_algorithms(False)
torch.set_num_threads(min(2, os.cpu_count() or 1))


import pytest  # noqa: E402

_DIST_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_rank_environment():
    """An in-process Trainer exports RANK / MASTER_PORT / ... (engine.distributed) for its process group; a later
    test's subprocess (the demo's training jobs) would inherit them and try to bind the same port."""
    before = {k: os.environ.get(k) for k in _DIST_VARIABLES}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
