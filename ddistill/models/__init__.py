"""DiT backbones (MDLM/DUO diffusion transformer and its causal twin) and the public checkpoint formats."""

from ddistill.models.checkpoints import CheckpointMismatchError, load_backbone_state, load_pretrained, save_pretrained
from ddistill.models.dit import MODEL_SIZES, DiT, ModelConfig, build_model, resolve_model_config

__all__ = [
    "MODEL_SIZES",
    "CheckpointMismatchError",
    "DiT",
    "ModelConfig",
    "build_model",
    "load_backbone_state",
    "load_pretrained",
    "resolve_model_config",
    "save_pretrained",
]
