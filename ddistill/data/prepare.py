"""``prepare(cfg)``: the set-up step behind ``ddistill prepare`` — fetch assets, tokenise, pack, cache.

Run it once (on one process) before a multi-rank job; every later ``build_token_blocks`` call for the same
config is a cache hit that only memory-maps the ``.npy``.
"""

from __future__ import annotations

from ddistill.data.classics import classics_dir
from ddistill.data.corpora import SPLITS, DataConfig
from ddistill.data.packing import TokenBlocks, build_token_blocks
from ddistill.data.tokenizer import gpt2_tokenizer_dir

__all__ = ["prepare"]


def prepare(cfg: DataConfig, splits: tuple[str, ...] = SPLITS, *, progress: bool = True) -> dict[str, TokenBlocks]:
    """Fetch what ``cfg`` needs, build the token blocks of each split and return them (printing a summary)."""
    gpt2_tokenizer_dir()  # HF tokenizer files, used by models / eval through get_tokenizer()
    if cfg.dataset == "classics":
        classics_dir()
    out = {}
    for split in splits:
        blocks = build_token_blocks(cfg, split, progress=progress)
        meta = blocks.meta
        print(f"[ddistill.data] {cfg.dataset}/{split}: {len(blocks)} blocks x {blocks.block_size} tokens "
              f"({meta['num_documents']} documents, {meta['num_tokens']} tokens) -> {blocks.path}")
        out[split] = blocks
    return out
