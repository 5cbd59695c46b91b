"""Token ids -> text for judging: decode with the diffusion model's tokenizer, keeping special tokens such as
``<|endoftext|>`` (the judge's first-EOS rule needs them) and dropping only the [MASK] id, which a finished sample
should not contain but a few-step sampler can leave behind (DUO, arXiv 2506.10892, §5 of our reference notes).
The tokenizer is the one the checkpoint records (``load_model_tokenizer``), never assumed.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_model_tokenizer(checkpoint: str | Path, vocab_size: int):
    """The tokenizer whose ids the model at ``checkpoint`` (with ``vocab_size`` logit columns) reads and writes.

    Its name comes from the checkpoint (``models.checkpoints.checkpoint_tokenizer``: GPT-2 for public checkpoints);
    a model whose vocabulary does not fit it raises one ValueError naming both sizes.
    """
    from ddistill.data.tokenizer import check_vocab_size, get_tokenizer
    from ddistill.models.checkpoints import checkpoint_tokenizer

    name = checkpoint_tokenizer(checkpoint)
    check_vocab_size(name, vocab_size, what=f"checkpoint {checkpoint}")
    return get_tokenizer(name)


def decode_samples(token_ids: torch.Tensor, tokenizer, mask_id: int | None = None) -> list[str]:
    """Decode each row of ``token_ids`` (B, L); ``mask_id`` defaults to ``tokenizer.mask_token_id`` (may be None)."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be (B, L), got shape {tuple(token_ids.shape)}")
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
    rows = token_ids.detach().cpu().tolist()
    if mask_id is not None:
        rows = [[t for t in row if t != mask_id] for row in rows]
    return [tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) for row in rows]
