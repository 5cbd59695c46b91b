"""``prepare(cfg)``: the set-up step behind ``ddistill prepare`` — fetch assets, tokenise, pack, cache.

Run it once (on one process) before a multi-rank job; every later ``build_token_blocks`` call for the same
config is a cache hit that only memory-maps the ``.npy``.
"""

from __future__ import annotations

from ddistill.data.classics import classics_dir
from ddistill.data.corpora import SPLITS, DataConfig
from ddistill.data.packing import TokenBlocks, build_token_blocks
from ddistill.data.tokenizer import get_tokenizer

__all__ = ["prepare"]


def prepare(cfg: DataConfig, splits: tuple[str, ...] = SPLITS, *, progress: bool = True) -> dict[str, TokenBlocks]:
    """Fetch what ``cfg`` needs, build the token blocks of each split and return them (printing a summary)."""
    if cfg.dataset == "classics" or cfg.tokenizer != "gpt2":
        classics_dir()  # the corpus, and the train split that a classics BPE is trained on
    get_tokenizer(cfg.tokenizer)  # builds the HF tokenizer files used by models / eval
    out = {}
    for split in splits:
        blocks = build_token_blocks(cfg, split, progress=progress)
        meta = blocks.meta
        print(f"[ddistill.data] {cfg.dataset}/{split}: {len(blocks)} blocks x {blocks.block_size} tokens "
              f"({meta['num_documents']} documents, {meta['num_tokens']} tokens) -> {blocks.path}")
        out[split] = blocks
    return out
