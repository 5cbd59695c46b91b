"""Packing documents into fixed-length token blocks, cached on disk as memory-mapped ``.npy`` files.

Wrapped mode (MDLM/DUO ``wrap=True``, arXiv 2406.07524 §C): the token stream
``doc_1 EOS doc_2 EOS …`` (EOS after each document when ``insert_eos``) is cut into consecutive chunks of
``L − 2`` tokens and each chunk is framed as ``[BOS] chunk [EOS]`` (BOS = EOS = the tokenizer's EOS id, GPT-2:
50256); the final partial chunk is dropped. Unwrapped mode: each document becomes ``[BOS] doc[:L−2] [EOS]``
followed by PAD (= the MASK id, the tokenizer's last id, GPT-2: 50257, which the BPE never emits), so
``valid = ids != PAD``. ``data.tokenizer`` names the tokenizer (``gpt2`` or ``classics-bpe-<V>``,
:mod:`ddistill.data.tokenizer`).
Documents that are empty or whitespace-only are skipped in both modes.

The blocks are stored as ``uint16`` (every allowed vocabulary, at most 65,536 ids, fits) in
``<cache>/tokens/<dataset>-<split>-L<L>-<wrap|pad>-<key>.npy`` where ``key`` hashes everything that
determines the ids (dataset, split, tokenizer fingerprint, block size, wrap/EOS flags, document limit and
the source files' sizes and mtimes, or the HF dataset fingerprint). The ``.npy`` is streamed into a
temporary file and renamed into place, and its ``.json`` metadata is written (also atomically) after it:
a crash never leaves a file that later loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ddistill.data.assets import cache_dir as default_cache_dir
from ddistill.data.assets import sha256_file
from ddistill.data.corpora import DataConfig, load_documents, local_source_files
from ddistill.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, get_encoder, tokenizer_fingerprint, tokenizer_spec

__all__ = ["TokenBlocks", "pack_wrapped", "pack_unwrapped", "build_token_blocks", "token_cache_path"]

STORAGE_DTYPE = np.uint16
_HEADER_BYTES = 128  # fixed .npy header slot, rewritten with the final shape once all blocks are known
_FORMAT_VERSION = 1
_ENCODE_BATCH = 512


def pack_wrapped(docs: Iterable[list[int]], block_size: int, *, insert_eos: bool = True,
                 bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> Iterator[np.ndarray]:
    """Yield ``(k, block_size)`` arrays of ``[BOS] stream-chunk [EOS]`` blocks (k >= 1), in stream order."""
    body = block_size - 2
    pending: list[np.ndarray] = []
    pending_len = 0
    for ids in docs:
        if insert_eos:
            ids = list(ids) + [eos_id]
        pending.append(np.asarray(ids, dtype=np.int64))
        pending_len += len(ids)
        if pending_len >= body:
            stream = np.concatenate(pending)
            k = len(stream) // body
            out = np.empty((k, block_size), dtype=np.int64)
            out[:, 0], out[:, -1] = bos_id, eos_id
            out[:, 1:-1] = stream[:k * body].reshape(k, body)
            yield out
            rest = stream[k * body:]
            pending, pending_len = [rest], len(rest)


def pack_unwrapped(docs: Iterable[list[int]], block_size: int, *, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                   pad_id: int = PAD_ID) -> Iterator[np.ndarray]:
    """Yield one ``(1, block_size)`` block per document: ``[BOS] doc[:L-2] [EOS] PAD…``."""
    for ids in docs:
        body = list(ids)[:block_size - 2]
        out = np.full((1, block_size), pad_id, dtype=np.int64)
        out[0, 0] = bos_id
        out[0, 1:1 + len(body)] = body
        out[0, 1 + len(body)] = eos_id
        yield out


class _NpyStreamWriter:
    """Append rows to a ``.npy`` whose row count is unknown until the end (fixed-size header slot)."""

    def __init__(self, path: Path, width: int, vocab_size: int) -> None:
        assert vocab_size <= np.iinfo(STORAGE_DTYPE).max + 1
        self.path, self.width, self.vocab_size, self.rows = path, width, vocab_size, 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * _HEADER_BYTES)

    def write(self, rows: np.ndarray) -> None:
        assert rows.ndim == 2 and rows.shape[1] == self.width
        assert rows.min() >= 0 and rows.max() < self.vocab_size
        self.file.write(np.ascontiguousarray(rows, dtype=STORAGE_DTYPE).tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        header = repr({"descr": np.dtype(STORAGE_DTYPE).str, "fortran_order": False,
                       "shape": (self.rows, self.width)}).encode("latin1")
        prefix = b"\x93NUMPY\x01\x00"
        pad = _HEADER_BYTES - len(prefix) - 2 - len(header) - 1
        assert pad >= 0
        self.file.seek(0)
        self.file.write(prefix + (len(header) + pad + 1).to_bytes(2, "little") + header + b" " * pad + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class TokenBlocks:
    """A cached ``(num_blocks, block_size)`` array of token ids, memory-mapped read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = json.loads(self.path.with_suffix(".json").read_text())
        self.blocks = np.load(self.path, mmap_mode="r")
        assert self.blocks.shape == (self.meta["num_blocks"], self.meta["block_size"]), self.blocks.shape

    @property
    def block_size(self) -> int:
        return self.blocks.shape[1]

    @property
    def wrap(self) -> bool:
        return self.meta["wrap"]

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        """Blocks as int64 (an int gives one row, a slice or index array gives a 2-D array)."""
        return np.asarray(self.blocks[index], dtype=np.int64)

    @property
    def pad_id(self) -> int:
        """The PAD (= [MASK]) id of the blocks' tokenizer."""
        return tokenizer_spec(self.meta["tokenizer"]).mask_id

    def valid_mask(self, ids: np.ndarray) -> np.ndarray:
        """True where a position holds a real token (PAD only occurs in unwrapped mode)."""
        return ids != self.pad_id

    def __repr__(self) -> str:
        return f"TokenBlocks({self.meta['dataset']}/{self.meta['split']}, {len(self)}x{self.block_size}, {self.path})"


def _file_stats(files: list[str]) -> list[tuple[str, int, int]]:
    return [(os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]


def _source_key(cfg: DataConfig, files: list[str]) -> dict:
    """What identifies a split's local source in the token-cache key.

    The embedded classics corpus is keyed by content (a sha256 of a ~13 MB file), so a cache directory copied to
    another machine or path (``DDISTILL_CACHE``, e.g. an offline compute node) is reused as is. User files are keyed
    by absolute path, size and mtime: cheap for large corpora, and a changed file is re-tokenised.
    """
    if cfg.dataset == "classics":
        return {"classics_sha256": [sha256_file(f) for f in files]}
    return {"files": _file_stats(files)}


def _cache_key(cfg: DataConfig, split: str, source: object) -> dict:
    return {"format": _FORMAT_VERSION, "dataset": cfg.dataset, "split": split, "tokenizer": cfg.tokenizer,
            "tokenizer_fingerprint": tokenizer_fingerprint(cfg.tokenizer), "block_size": cfg.block_size,
            "wrap": cfg.wrap,
            "insert_eos": cfg.insert_eos if cfg.wrap else None, "max_documents": cfg.max_documents,
            "valid_documents": cfg.valid_documents, "sample_by": cfg.sample_by, "text_field": cfg.text_field,
            "source": source}


def token_cache_path(cfg: DataConfig, split: str, key: dict) -> Path:
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir() / "tokens"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    mode = "wrap" if cfg.wrap else "pad"
    return root / f"{cfg.dataset}-{split}-L{cfg.block_size}-{mode}-{digest}.npy"


def _encode_documents(ds, tokenizer: str, num_threads: int, progress: bool, stats: dict) -> Iterator[list[int]]:
    from tqdm.auto import tqdm

    encode = get_encoder(tokenizer)
    with tqdm(total=len(ds), desc="tokenising", unit="doc", disable=not progress) as bar:
        for batch in ds.iter(batch_size=_ENCODE_BATCH):
            texts = [t for t in batch["text"] if t and not t.isspace()]
            for ids in encode(texts, num_threads):
                stats["documents"] += 1
                stats["tokens"] += len(ids)
                yield ids
            bar.update(len(batch["text"]))


def build_token_blocks(cfg: DataConfig, split: str, *, progress: bool = False) -> TokenBlocks:
    """Tokenise and pack ``split`` of ``cfg``'s dataset (or load it from the token cache)."""
    spec = tokenizer_spec(cfg.tokenizer)
    files = local_source_files(cfg, split)
    ds = None
    if files is not None:
        source = _source_key(cfg, files)
    else:  # HF hub dataset: its fingerprint identifies the cached arrow data
        ds = load_documents(cfg, split)
        source = {"hf_fingerprint": ds._fingerprint, "rows": len(ds)}
    key = _cache_key(cfg, split, source)
    path = token_cache_path(cfg, split, key)
    if path.is_file() and path.with_suffix(".json").is_file():
        return TokenBlocks(path)

    ds = load_documents(cfg, split) if ds is None else ds
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    stats = {"documents": 0, "tokens": 0}
    docs = _encode_documents(ds, cfg.tokenizer, cfg.num_proc or os.cpu_count() or 1, progress, stats)
    chunks = (pack_wrapped(docs, cfg.block_size, insert_eos=cfg.insert_eos, bos_id=spec.eos_id, eos_id=spec.eos_id)
              if cfg.wrap else
              pack_unwrapped(docs, cfg.block_size, bos_id=spec.eos_id, eos_id=spec.eos_id, pad_id=spec.mask_id))
    writer = _NpyStreamWriter(tmp, cfg.block_size, spec.vocab_size)
    try:
        for chunk in chunks:
            writer.write(chunk)
        writer.close()
        if writer.rows == 0:
            raise ValueError(f"{cfg.dataset}/{split}: {stats['tokens']} tokens in {stats['documents']} documents "
                             f"do not fill one block of {cfg.block_size}; use a smaller block_size")
        meta = dict(key, num_blocks=writer.rows, num_documents=stats["documents"], num_tokens=stats["tokens"],
                    dtype=np.dtype(STORAGE_DTYPE).name)
        os.replace(tmp, path)
        meta_tmp = path.with_name(f".{path.stem}.json.tmp-{os.getpid()}")
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, path.with_suffix(".json"))
    finally:
        if not writer.file.closed:
            writer.file.close()
        tmp.unlink(missing_ok=True)
    return TokenBlocks(path)
