"""ddistill: distillation of discrete diffusion language models."""
