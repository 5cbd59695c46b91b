"""The classics byte-level BPE: special ids last, round trips, deterministic builds keyed by corpus content and
vocabulary size, packing with it, and the one model/tokenizer mismatch error (run config, init_from, sample)."""

import json
import re

import numpy as np
import pytest
import torch

from ddistill.data import assets, classics, classics_bpe
from ddistill.data.corpora import DataConfig, load_documents
from ddistill.data.packing import build_token_blocks
from ddistill.data.tokenizer import check_vocab_size, get_encoder, get_tokenizer, tokenizer_spec

NAME = "classics-bpe-4096"  # built once in the shared asset cache (the CPU demo uses classics-bpe-512)
EDGE_CASES = [
    "", " ", "   leading spaces", "trailing   ", "tabs\tand\nnew\n\nlines\r\n", "don't you'll we've I'M",
    "naïve café — “quotes” … 東京 🚀🚀 \u00a0nbsp", "numbers 1234567 3.14159 1e-10", "x" * 300,
    "Thou art more lovely and more temperate.<|endoftext|>[MASK] tail",
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(NAME)


def test_spec_from_the_name_alone():
    assert tokenizer_spec("gpt2").vocab_size == 50258 and tokenizer_spec("gpt2").mask_id == 50257
    spec = tokenizer_spec("classics-bpe-4096")
    assert (spec.vocab_size, spec.eos_id, spec.mask_id) == (4096, 4094, 4095)
    for bad in ("gpt3", "classics-bpe-", "classics-bpe-100", "classics-bpe-70000", "classics-bpe-4k"):
        with pytest.raises(ValueError, match="allowed: 'gpt2' or 'classics-bpe-<V>'"):
            tokenizer_spec(bad)
    with pytest.raises(ValueError, match="data.tokenizer: tokenizer 'gpt3' is not known"):
        DataConfig(tokenizer="gpt3")


def test_special_ids_are_last_and_round_trip(tok):
    assert len(tok) == 4096 and tok.eos_token_id == tok.bos_token_id == 4094
    assert tok.mask_token_id == tok.pad_token_id == 4095 and tok.convert_ids_to_tokens([4094, 4095]) == [
        "<|endoftext|>", "[MASK]"]
    encode = get_encoder(NAME)
    for text in EDGE_CASES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
        assert max(ids, default=0) < 4096
    # corpus encoding (no special tokens): the special strings are plain text there, never ids 4094/4095
    plain = encode(EDGE_CASES, 1)
    assert all(4094 not in ids and 4095 not in ids for ids in plain)
    assert [tok.decode(ids) for ids in plain] == EDGE_CASES
    # every byte is reachable: arbitrary bytes decode back (byte-level alphabet of 256 symbols)
    raw = bytes(range(256)).decode("latin-1")
    assert tok.decode(tok(raw, add_special_tokens=False)["input_ids"]) == raw


def test_compresses_classics_prose(tok):
    """A trained BPE, not a byte tokenizer: held-out prose takes well under one id per 3 characters."""
    text = load_documents(DataConfig(dataset="classics"), "validation")["text"][0][:20000]
    ids = get_encoder(NAME)([text], 1)[0]
    assert len(text) / len(ids) > 3.0


def _small_corpus(tmp_path, text):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    return path


def test_build_is_deterministic_and_keyed_by_content_and_size(tmp_path, monkeypatch):
    texts = load_documents(DataConfig(dataset="classics"), "validation")["text"]
    corpus = _small_corpus(tmp_path, texts)
    monkeypatch.setattr(classics, "classics_files", lambda: {"train": corpus})
    classics_bpe._train_split_sha256.cache_clear()
    dirs = []
    for root in ("a", "b"):
        monkeypatch.setenv("DDISTILL_CACHE", str(tmp_path / root))
        dirs.append(classics_bpe.classics_bpe_dir(600))
    first, second = dirs
    assert first.name == second.name and first != second
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()  # two builds agree
    mtime = (second / "tokenizer.json").stat().st_mtime_ns
    assert classics_bpe.classics_bpe_dir(600) == second and (second / "tokenizer.json").stat().st_mtime_ns == mtime
    assert classics_bpe.classics_bpe_dir(700).name != second.name  # keyed by vocabulary size
    assert sorted(p.name for p in second.parent.iterdir()) == sorted([second.name, classics_bpe.classics_bpe_dir(
        700).name])  # no temporary leftovers
    corpus.write_text(corpus.read_text().replace("the", "thee"))  # keyed by content, not by path
    classics_bpe._train_split_sha256.cache_clear()
    assert classics_bpe.classics_bpe_dir(600).name != second.name
    classics_bpe._train_split_sha256.cache_clear()


def test_too_small_corpus_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="gives only .* symbols"):
        classics_bpe.train_bpe(["tiny corpus"], 4096)


def test_packing_uses_the_named_tokenizer(tmp_path, tok):
    docs = load_documents(DataConfig(dataset="classics"), "validation")["text"]
    cfg = DataConfig(dataset="classics", tokenizer=NAME, block_size=64, cache_dir=str(tmp_path))
    blocks = build_token_blocks(cfg, "validation")
    stream = [t for ids in get_encoder(NAME)(docs, 1) for t in ids + [4094]]
    arr = blocks[:]
    assert arr.shape == (len(stream) // 62, 64) and arr.max() < 4095  # [MASK] never in the data
    assert (arr[:, 0] == 4094).all() and (arr[:, -1] == 4094).all()
    assert arr[:, 1:-1].ravel().tolist() == stream[: len(arr) * 62]
    assert blocks.meta["tokenizer"] == NAME and blocks.pad_id == 4095
    gpt2 = build_token_blocks(DataConfig(dataset="classics", block_size=64, cache_dir=str(tmp_path)), "validation")
    assert gpt2.path != blocks.path and gpt2.meta["tokenizer_fingerprint"] != blocks.meta["tokenizer_fingerprint"]
    assert tok.decode(arr[0, 1:-1].tolist()) == docs[0][: len(tok.decode(arr[0, 1:-1].tolist()))]
    # unwrapped: PAD is the tokenizer's [MASK] id
    padded = build_token_blocks(DataConfig(dataset="classics", tokenizer=NAME, block_size=64, wrap=False,
                                           cache_dir=str(tmp_path)), "validation")
    assert padded.valid_mask(padded[:]).all()  # documents are longer than a block: nothing padded, EOS last
    assert (padded[:][:, -1] == 4094).all()


def test_model_tokenizer_mismatch_is_one_error(tmp_path):
    from ddistill.config import ConfigError
    from ddistill.engine.run_config import load_run_config
    from ddistill.eval.decode import load_model_tokenizer
    from ddistill.models.checkpoints import checkpoint_tokenizer, save_pretrained
    from ddistill.models.dit import build_model

    from ddistill.engine.trainer import Trainer

    mismatched = load_run_config("configs/experiments/classics_mdlm_test.yaml", ["data.tokenizer=classics-bpe-4096"])
    # A run that builds its token blocks from the corpus refuses first thing (tests that hand the trainer their own
    # blocks may use toy vocabularies).
    with pytest.raises(ConfigError, match=r"model.vocab_size has a vocabulary of 50258 ids but its tokenizer "
                                          r"'classics-bpe-4096' has 4096"):
        Trainer(mismatched)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_run_config("configs/experiments/classics_mdlm_test.yaml", ["data.tokenizer=bpe-of-my-own"])
    cfg = load_run_config("configs/experiments/classics_mdlm_test.yaml",
                          ["data.tokenizer=classics-bpe-4096", "model.vocab_size=4096"])
    assert cfg.model.vocab_size == 4096
    model = build_model(dict(size="test", vocab_size=4096))
    export = save_pretrained(model, tmp_path / "export", tokenizer=NAME)
    assert checkpoint_tokenizer(export) == NAME and json.loads((export / "config.json").read_text())[
        "tokenizer"] == NAME
    assert len(load_model_tokenizer(export, 4096)) == 4096
    with pytest.raises(ValueError, match="vocabulary of 50258 ids but its tokenizer 'classics-bpe-4096'"):
        load_model_tokenizer(export, 50258)
    legacy = tmp_path / "public"  # a public checkpoint's config.json names no tokenizer: GPT-2
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"model_type": "mdlm", "vocab_size": 50258}))
    assert checkpoint_tokenizer(legacy) == "gpt2"
    with pytest.raises(ValueError, match="vocabulary of 4096 ids but its tokenizer 'gpt2' has 50258"):
        load_model_tokenizer(legacy, 4096)


def test_sample_cli_decodes_with_the_checkpoints_tokenizer(tmp_path, capsys):
    """`ddistill sample` on a classics-BPE export decodes with that BPE; a doctored vocabulary is one line."""
    from ddistill.cli import main
    from ddistill.models.checkpoints import save_pretrained
    from ddistill.models.dit import build_model

    torch.manual_seed(0)
    export = save_pretrained(build_model(dict(size="test", vocab_size=4096, length=16)), tmp_path / "e",
                             tokenizer=NAME)
    out = tmp_path / "s.jsonl"
    main(["sample", str(export), "--steps", "4", "--num-samples", "2", "--batch-size", "2", "--out", str(out)])
    tok = get_tokenizer(NAME)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for rec in records:
        assert max(rec["token_ids"]) < 4096
        kept = [t for t in rec["token_ids"] if t != 4095]
        assert rec["text"] == tok.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "tokenizer": "gpt2"}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(export), "--steps", "4", "--num-samples", "1", "--batch-size", "1"])
    assert exit_info.value.code == 2  # bad input: one line, no traceback
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"ddistill sample: checkpoint .* has a vocabulary of 4096 ids but its tokenizer 'gpt2' has 50258",
                    line), line


def test_init_from_with_another_tokenizer_is_refused(tmp_path):
    from ddistill.config import ConfigError
    from ddistill.engine.run_config import load_run_config
    from ddistill.engine.trainer import Trainer
    from ddistill.models.checkpoints import save_pretrained
    from ddistill.models.dit import build_model

    export = save_pretrained(build_model(dict(size="test", vocab_size=4096, length=16, time_conditioning=False)),
                             tmp_path / "teacher", tokenizer=NAME)
    cfg = load_run_config("configs/experiments/sdtt_classics_tiny.yaml", [
        "model.size=test", "model.length=16", "data.block_size=16", "train.device=cpu", f"init_from={export}",
        f"train.out_dir={tmp_path / 'run'}", "train.global_batch_size=2", "train.micro_batch_size=2",
        "logging.wandb=disabled"])
    with pytest.raises(ConfigError, match="was trained with tokenizer 'classics-bpe-4096' but data.tokenizer='gpt2'"):
        Trainer(cfg, train_blocks=np.zeros((4, 16), dtype=np.int64))
    assert not (tmp_path / "run").exists()
