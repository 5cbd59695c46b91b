"""Document sources: local text / jsonl, hub branches driven by local files in the hub format, config errors."""

import json

import pytest

from ddistill.data.corpora import DATASETS, DataConfig, load_documents
from ddistill.data.packing import build_token_blocks
from ddistill.data.tokenizer import EOS_ID, get_encoding

DOCS = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 5 + 1) for i in range(20)]


def _write_parquet(path, texts, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def test_openwebtext_branch_last_n_validation(tmp_path):
    """OWT-format parquet shards (``text`` column) through the openwebtext code path: last N docs = validation."""
    shards = tmp_path / "owt"
    _write_parquet(shards / "train-00000-of-00002.parquet", DOCS[:12])
    _write_parquet(shards / "train-00001-of-00002.parquet", DOCS[12:])
    cfg = DataConfig(dataset="openwebtext", path=str(shards), valid_documents=5, block_size=32,
                     cache_dir=str(tmp_path / "tok"))
    assert load_documents(cfg, "train")["text"] == DOCS[:15]
    assert load_documents(cfg, "validation")["text"] == DOCS[15:]
    blocks = build_token_blocks(cfg, "validation")
    stream = [t for ids in get_encoding().encode_ordinary_batch(DOCS[15:]) for t in ids + [EOS_ID]]
    assert blocks[:][:, 1:-1].ravel().tolist() == stream[: len(blocks) * 30]
    with pytest.raises(ValueError, match="valid_documents"):
        load_documents(DataConfig(dataset="openwebtext", path=str(shards), valid_documents=20), "train")


def test_default_owt_validation_size_is_100k(tmp_path):
    path = _write_parquet(tmp_path / "owt.parquet", DOCS)
    with pytest.raises(ValueError, match="100000-document validation"):
        load_documents(DataConfig(dataset="openwebtext", path=str(path)), "validation")


def test_hub_branches_with_separate_validation_files(tmp_path):
    train = _write_parquet(tmp_path / "lm1b" / "train.parquet", DOCS[:10])
    test = _write_parquet(tmp_path / "lm1b" / "test.parquet", DOCS[10:13])
    for name in ("lm1b", "wikitext103"):
        cfg = DataConfig(dataset=name, path=str(train), valid_path=str(test))
        assert load_documents(cfg, "train")["text"] == DOCS[:10]
        assert load_documents(cfg, "validation")["text"] == DOCS[10:13]
        with pytest.raises(ValueError, match="valid_path"):
            load_documents(DataConfig(dataset=name, path=str(train)), "validation")


def test_hub_unreachable_names_the_fix():
    # tests run with HF_DATASETS_OFFLINE=1 (conftest): the hub path must fail at once with a useful message
    with pytest.raises(RuntimeError, match="path="):
        load_documents(DataConfig(dataset="wikitext103"), "validation")


def test_local_text_document_and_paragraph(tmp_path):
    root = tmp_path / "txt"
    root.mkdir()
    for i in range(4):
        (root / f"f{i}.txt").write_text(f"para {i}a\nline two\n\npara {i}b\n")
    cfg = DataConfig(dataset="text", path=str(root), valid_documents=1)
    assert load_documents(cfg, "train")["text"] == [f"para {i}a\nline two\n\npara {i}b\n" for i in range(3)]
    assert load_documents(cfg, "validation")["text"] == ["para 3a\nline two\n\npara 3b\n"]
    para = DataConfig(dataset="text", path=str(root / "f0.txt"), sample_by="paragraph", valid_documents=1)
    assert load_documents(para, "train")["text"] == ["para 0a\nline two"]
    assert load_documents(para, "validation")["text"] == ["para 0b\n"]


def test_local_jsonl_with_field_and_valid_path(tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS[:8])))
    valid.write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS[8:10])))
    cfg = DataConfig(dataset="jsonl", path=str(train), valid_path=str(valid), text_field="body", max_documents=6)
    ds = load_documents(cfg, "train")
    assert ds.column_names == ["text"] and ds["text"] == DOCS[:6]
    assert load_documents(cfg, "validation")["text"] == DOCS[8:10]
    with pytest.raises(ValueError, match="text_field"):
        load_documents(DataConfig(dataset="jsonl", path=str(train), valid_path=str(valid)), "train")


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="allowed") as err:
        DataConfig(dataset="c4")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="character-level"):
        DataConfig(dataset="text8")
    with pytest.raises(ValueError, match="path"):
        DataConfig(dataset="text")
    with pytest.raises(ValueError, match="block_size"):
        DataConfig(block_size=2)
    with pytest.raises(ValueError, match="sample_by"):
        DataConfig(dataset="text", path="x", sample_by="sentence")
    with pytest.raises(FileNotFoundError, match="no data files"):
        load_documents(DataConfig(dataset="text", path=str(tmp_path / "missing*.txt")), "train")
    with pytest.raises(ValueError, match="split"):
        load_documents(DataConfig(), "test")
