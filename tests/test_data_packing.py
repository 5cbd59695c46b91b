"""Packing into [BOS] … [EOS] blocks, the memory-mapped token cache, cache keys and crash safety."""

import json
import os

import numpy as np
import pytest

from ddistill.data import packing
from ddistill.data.corpora import DataConfig, load_documents
from ddistill.data.packing import TokenBlocks, build_token_blocks, pack_unwrapped, pack_wrapped
from ddistill.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, get_encoding


def _random_docs(rng, n, max_len=40):
    return [list(rng.integers(0, 50000, size=int(rng.integers(0, max_len)))) for _ in range(n)]


@pytest.mark.parametrize("insert_eos", [True, False])
@pytest.mark.parametrize("block_size", [3, 8, 33])
def test_pack_wrapped_matches_brute_force(block_size, insert_eos):
    docs = _random_docs(np.random.default_rng(block_size), 50)
    stream = [t for d in docs for t in (d + [EOS_ID] if insert_eos else d)]
    blocks = np.concatenate(list(pack_wrapped(iter(docs), block_size, insert_eos=insert_eos)))
    body = block_size - 2
    assert blocks.shape == (len(stream) // body, block_size)
    assert (blocks[:, 0] == BOS_ID).all() and (blocks[:, -1] == EOS_ID).all()
    assert blocks[:, 1:-1].ravel().tolist() == stream[: len(blocks) * body]


def test_pack_unwrapped_pads_and_truncates():
    docs = [[1, 2, 3], list(range(10, 30)), []]
    blocks = np.concatenate(list(pack_unwrapped(docs, 8)))
    assert blocks.tolist() == [
        [BOS_ID, 1, 2, 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
        [BOS_ID, 10, 11, 12, 13, 14, 15, EOS_ID],
        [BOS_ID, EOS_ID] + [PAD_ID] * 6,
    ]
    assert (blocks != PAD_ID).sum(1).tolist() == [5, 8, 2]


def test_npy_stream_writer_round_trip(tmp_path):
    rows = np.random.default_rng(0).integers(0, 50258, size=(37, 16))
    writer = packing._NpyStreamWriter(tmp_path / "x.npy", 16, 50258)
    for i in range(0, 37, 10):
        writer.write(rows[i:i + 10])
    writer.close()
    loaded = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert loaded.dtype == np.uint16 and loaded.shape == (37, 16) and (loaded == rows).all()


def _write_text_corpus(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(d)
    return root


def test_build_token_blocks_reproduces_stream(tmp_path):
    docs = load_documents(DataConfig(dataset="classics"), "validation")["text"]
    cfg = DataConfig(dataset="classics", block_size=128, cache_dir=str(tmp_path))
    blocks = build_token_blocks(cfg, "validation")
    stream = [t for ids in get_encoding().encode_ordinary_batch(docs) for t in ids + [EOS_ID]]
    assert blocks.meta["num_tokens"] + len(docs) == len(stream)
    arr = blocks[:]
    assert arr.dtype == np.int64 and arr.shape == (len(stream) // 126, 128) == (len(blocks), blocks.block_size)
    assert (arr[:, 0] == BOS_ID).all() and (arr[:, -1] == EOS_ID).all()
    assert arr[:, 1:-1].ravel().tolist() == stream[: len(arr) * 126]
    assert blocks[3].tolist() == arr[3].tolist()


def test_unwrapped_blocks(tmp_path):
    corpus = _write_text_corpus(tmp_path / "c", ["short doc", "  \n ", "a much longer document " * 20, "x y"])
    cfg = DataConfig(dataset="text", path=str(corpus), wrap=False, block_size=16, valid_documents=1,
                     cache_dir=str(tmp_path / "tok"))
    blocks = build_token_blocks(cfg, "train")
    enc = get_encoding()
    expected = [[BOS_ID] + enc.encode_ordinary("short doc") + [EOS_ID],
                [BOS_ID] + enc.encode_ordinary("a much longer document " * 20)[:14] + [EOS_ID]]
    assert blocks.meta["num_documents"] == 2  # the whitespace-only document is skipped
    for row, exp in zip(blocks[:], expected, strict=True):
        assert row[blocks.valid_mask(row)].tolist() == exp
        assert (row[len(exp):] == PAD_ID).all()


def test_cache_hit_key_and_crash_safety(tmp_path, monkeypatch):
    corpus = _write_text_corpus(tmp_path / "c", [f"document number {i} " * 30 for i in range(6)])
    cfg = DataConfig(dataset="text", path=str(corpus), block_size=32, valid_documents=2,
                     cache_dir=str(tmp_path / "tok"))

    # a crash mid-build leaves nothing that loads and no temp file behind
    real_pack = packing.pack_wrapped

    def exploding(docs, block_size, **kwargs):
        yield from real_pack(docs, block_size, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(packing, "pack_wrapped", exploding)
    with pytest.raises(KeyboardInterrupt):
        build_token_blocks(cfg, "train")
    assert list((tmp_path / "tok").iterdir()) == []
    monkeypatch.undo()

    first = build_token_blocks(cfg, "train")
    mtime = first.path.stat().st_mtime_ns
    again = build_token_blocks(cfg, "train")
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # cache hit, nothing rewritten
    assert json.loads(first.path.with_suffix(".json").read_text())["num_blocks"] == len(first)
    assert build_token_blocks(DataConfig(**{**cfg.__dict__, "block_size": 64}), "train").path != first.path
    assert build_token_blocks(cfg, "validation").path != first.path

    doc = corpus / "doc000.txt"
    doc.write_text(doc.read_text() + " edited")
    os.utime(doc, ns=(mtime + 10**9, mtime + 10**9))
    rebuilt = build_token_blocks(cfg, "train")
    assert rebuilt.path != first.path

    # an .npy without its metadata (crash between the two renames) is rebuilt, not loaded
    expected = rebuilt[:]
    del rebuilt
    path = build_token_blocks(cfg, "train").path
    path.with_suffix(".json").unlink()
    path.write_bytes(b"garbage")
    recovered = build_token_blocks(cfg, "train")
    assert recovered.path == path and (recovered[:] == expected).all()


def test_too_small_corpus_is_an_error(tmp_path):
    corpus = _write_text_corpus(tmp_path / "c", ["tiny", "also tiny"])
    cfg = DataConfig(dataset="text", path=str(corpus), block_size=1024, valid_documents=1,
                     cache_dir=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="block_size"):
        build_token_blocks(cfg, "train")
    assert list((tmp_path / "tok").iterdir()) == []


def test_prepare_builds_both_splits(tmp_path, capsys):
    from ddistill.data import prepare

    corpus = _write_text_corpus(tmp_path / "c", [f"text {i} " * 50 for i in range(10)])
    cfg = DataConfig(dataset="text", path=str(corpus), block_size=32, valid_documents=2,
                     cache_dir=str(tmp_path / "tok"))
    out = prepare(cfg, progress=False)
    assert set(out) == {"train", "validation"}
    assert out["train"].meta["num_documents"] == 8 and out["validation"].meta["num_documents"] == 2
    assert "text/validation" in capsys.readouterr().out
    assert prepare(cfg, progress=False)["train"].path == out["train"].path


def test_classics_token_cache_is_reused_after_a_move(tmp_path, monkeypatch):
    """A classics token cache copied to another cache root (an offline node) loads without re-tokenising."""
    import shutil

    from ddistill.data import assets, classics

    cfg = DataConfig(dataset="classics", block_size=128)
    built = build_token_blocks(cfg, "validation")
    expected = built[:]
    moved = tmp_path / "moved"
    for sub in ("corpora/" + classics.classics_dir().name, "assets/" + assets.gpt2_tiktoken_path().parent.name):
        shutil.copytree(assets.cache_dir() / sub, moved / sub)
    (moved / "tokens").mkdir()
    for suffix in (".npy", ".json"):
        shutil.copy2(built.path.with_suffix(suffix), moved / "tokens" / built.path.with_suffix(suffix).name)
    del built

    monkeypatch.setenv("DDISTILL_CACHE", str(moved))

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the moved cache was not reused")

    monkeypatch.setattr(packing, "load_documents", no_tokenising)
    reused = build_token_blocks(cfg, "validation")
    assert reused.path.parent == moved / "tokens" and (reused[:] == expected).all()
