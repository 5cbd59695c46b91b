"""Document sources: the registry-built "classics" corpus, HF hub datasets and local text/JSONL files.

Every source is returned as a ``datasets.Dataset`` with one string column ``text`` (one row = one document),
so the packing code is the same for all of them. Splits follow the references:

* ``openwebtext`` (``Skylion007/openwebtext``) has only ``train``; as in MDLM/DUO's ``openwebtext-split``
  (arXiv 2406.07524 §C, 2506.10892) the **last 100,000 documents of train are the validation split** and
  the rest is train (``valid_documents`` overrides the 100K, e.g. for tests).
* ``lm1b`` (``dvruette/lm1b``, the parquet copy of the One Billion Word benchmark): train / test; test serves
  as validation, as in MDLM/DUO. Tokenised with GPT-2 here (DUO's zero-shot ``lm1b-gpt2`` variant), not BERT.
* ``wikitext103`` (``Salesforce/wikitext``, config ``wikitext-103-raw-v1``): train / validation; rows are lines.
* ``text`` / ``jsonl``: local files through ``datasets``' own ``text`` and ``json`` builders; validation comes
  from ``valid_path`` or, without it, from the last ``valid_documents`` documents (default: 1%, at least one).
* ``path`` on a hub dataset points the same code at local files in the hub's format (parquet / arrow / json
  with a ``text`` column) instead of the hub: that is how the hub branches are tested offline.

text8 is deliberately unsupported: it is a character-level benchmark (27 symbols), while every ddistill model
uses the GPT-2 vocabulary.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from ddistill.data.classics import classics_files
from ddistill.data.tokenizer import tokenizer_spec

__all__ = ["DATASETS", "SPLITS", "DataConfig", "load_documents", "local_source_files"]

DATASETS = ("classics", "openwebtext", "lm1b", "wikitext103", "text", "jsonl")
SPLITS = ("train", "validation")
SAMPLE_BY = ("document", "paragraph", "line")
OWT_VALID_DOCUMENTS = 100_000
# dataset -> (hub id, config name, hub split for train, hub split for validation)
HUB = {
    "openwebtext": ("Skylion007/openwebtext", None, "train", None),
    "lm1b": ("dvruette/lm1b", None, "train", "test"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "validation"),
}
_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
                      ".txt": "text", ".text": "text"}


@dataclass(kw_only=True)
class DataConfig:
    """Which documents to read and how to pack them into fixed-length token blocks."""

    dataset: str = "classics"
    path: str | None = None  # local files (file, glob or directory): the data of text/jsonl, or a hub override
    valid_path: str | None = None  # local validation files; default: the last `valid_documents` of train
    valid_documents: int | None = None  # last-N validation rule (openwebtext: 100K; text/jsonl: 1%)
    text_field: str = "text"  # jsonl / hub-override column holding the document
    sample_by: str = "document"  # text files: one document per file, paragraph ("\n\n") or line
    block_size: int = 1024
    wrap: bool = True  # pack documents + EOS into blocks; False: one document per block, padded
    insert_eos: bool = True  # wrap mode: EOS after every document
    tokenizer: str = "gpt2"  # "gpt2" or "classics-bpe-<V>" (ddistill.data.tokenizer); model.vocab_size must match
    max_documents: int | None = None  # keep only the first N documents of each split (quick runs)
    cache_dir: str | None = None  # token cache root (default: cache_dir()/tokens)
    datasets_cache_dir: str | None = None  # HF datasets cache (default: HF_DATASETS_CACHE)
    num_proc: int | None = None  # processes for HF dataset preparation / threads for tokenisation

    def __post_init__(self) -> None:
        if self.dataset == "text8":
            raise ValueError("dataset 'text8' is not supported: it is a character-level benchmark (27 symbols) "
                             f"and ddistill models use the GPT-2 vocabulary; allowed datasets: {DATASETS}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; allowed: {DATASETS}")
        if self.dataset in ("text", "jsonl") and not self.path:
            raise ValueError(f"dataset {self.dataset!r} needs path= (a file, glob or directory)")
        if self.dataset == "classics" and (self.path or self.valid_path):
            raise ValueError("dataset 'classics' is built from registry assets; path/valid_path must be None")
        if self.sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by={self.sample_by!r}; allowed: {SAMPLE_BY}")
        try:
            tokenizer_spec(self.tokenizer)
        except ValueError as err:
            raise ValueError(f"data.tokenizer: {err}") from None
        if self.block_size < 3:
            raise ValueError(f"block_size={self.block_size} must be >= 3 (BOS + at least one token + EOS)")
        if self.valid_documents is not None and self.valid_documents < 1:
            raise ValueError(f"valid_documents={self.valid_documents} must be >= 1")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents={self.max_documents} must be >= 1")


def _resolve_files(spec: str) -> list[str]:
    """Files named by ``spec``: a file, a glob, or every regular file of a directory (sorted)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no data files match {spec!r}")
    return files


def local_source_files(cfg: DataConfig, split: str) -> list[str] | None:
    """The local files a split is read from (for cache keys), or None when it comes from the HF hub."""
    if cfg.dataset == "classics":
        return [str(classics_files()[split])]
    if cfg.path is None:
        return None
    files = _resolve_files(cfg.path)
    if split == "validation" and cfg.valid_path:
        files = _resolve_files(cfg.valid_path)
    elif split == "validation" and cfg.dataset in HUB and HUB[cfg.dataset][3] is not None:
        raise ValueError(f"dataset {cfg.dataset!r} with a local path= override needs valid_path= for its "
                         f"{HUB[cfg.dataset][3]!r} split")
    return files


def _builder_for(files: list[str]) -> str:
    suffixes = {Path(f).suffix for f in files}
    builders = {_BUILDER_BY_SUFFIX.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"cannot infer one file format from suffixes {sorted(suffixes)}; "
                         f"supported: {sorted(_BUILDER_BY_SUFFIX)}")
    return builders.pop()


def _load_files(cfg: DataConfig, files: list[str], builder: str | None = None):
    import datasets

    builder = builder or _builder_for(files)
    kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files={"train": files}, split="train",
                                 cache_dir=cfg.datasets_cache_dir, num_proc=cfg.num_proc, **kwargs)


def _load_hub(cfg: DataConfig, hub_split: str):
    import datasets

    hub_id, config, _, _ = HUB[cfg.dataset]
    try:
        return datasets.load_dataset(hub_id, config, split=hub_split, cache_dir=cfg.datasets_cache_dir,
                                     num_proc=cfg.num_proc)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError, ...)
        raise RuntimeError(
            f"loading {hub_id!r} (config {config}, split {hub_split!r}) from the HF hub failed: {exc}. "
            "It needs network access to huggingface.co (and HF_DATASETS_OFFLINE unset) or a populated HF "
            "datasets cache; or pass path= pointing at local files in the same format.") from exc


def _last_n(ds, n_valid: int, split: str, what: str):
    """Split rule of openwebtext-split: the last ``n_valid`` rows are validation, the rest train."""
    n = len(ds)
    if n <= n_valid:
        raise ValueError(f"{what}: {n} documents cannot give a {n_valid}-document validation split "
                         "(lower valid_documents)")
    return ds.select(range(n - n_valid)) if split == "train" else ds.select(range(n - n_valid, n))


def load_documents(cfg: DataConfig, split: str):
    """The documents of ``split`` as a ``datasets.Dataset`` with the single column ``text``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {SPLITS}")
    files = local_source_files(cfg, split)
    if cfg.dataset == "classics":
        ds = _load_files(cfg, files, "json")
    elif cfg.dataset in ("text", "jsonl"):
        builder = "text" if cfg.dataset == "text" else "json"
        ds = _load_files(cfg, files, builder)
        if not cfg.valid_path:
            ds = _last_n(ds, cfg.valid_documents or max(1, len(ds) // 100), split, f"{cfg.dataset} {cfg.path}")
    else:  # hub dataset, or its local override in the same format
        _, _, hub_train, hub_valid = HUB[cfg.dataset]
        hub_split = hub_train if split == "train" or hub_valid is None else hub_valid
        ds = _load_files(cfg, files) if files is not None else _load_hub(cfg, hub_split)
        if cfg.dataset == "openwebtext":
            ds = _last_n(ds, cfg.valid_documents or OWT_VALID_DOCUMENTS, split, "openwebtext")
    if cfg.text_field not in ds.column_names:
        raise ValueError(f"{cfg.dataset} documents have no column {cfg.text_field!r} "
                         f"(columns: {ds.column_names}); set text_field=")
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text")
    if cfg.max_documents is not None and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    return ds
