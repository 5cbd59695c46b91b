"""Data: offline GPT-2 tokenizer, corpora, packed token blocks and the resumable block loader."""

from ddistill.data.corpora import DATASETS, DataConfig, load_documents
from ddistill.data.loader import BlockLoader, LoaderStateError
from ddistill.data.packing import TokenBlocks, build_token_blocks
from ddistill.data.prepare import prepare
from ddistill.data.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE, get_encoding, get_tokenizer

__all__ = [
    "BOS_ID", "EOS_ID", "MASK_ID", "PAD_ID", "VOCAB_SIZE", "DATASETS",
    "DataConfig", "TokenBlocks", "BlockLoader", "LoaderStateError",
    "build_token_blocks", "get_encoding", "get_tokenizer", "load_documents", "prepare",
]
