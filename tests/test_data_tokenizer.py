"""GPT-2 tokenizer built offline from gpt2.tiktoken: known ids, HF path == tiktoken path, round trips, [MASK]."""

import hashlib
import json
import shutil

import pytest

from ddistill.data import assets
from ddistill.data.classics import load_classics
from ddistill.data.tokenizer import (
    BOS_ID, EOS_ID, MASK_ID, PAD_ID, R50K_PATTERN, VOCAB_SIZE, get_encoding, get_tokenizer, gpt2_tokenizer_dir,
)

HELLO = ("Hello world", [15496, 995])
FOX = ("The quick brown fox jumps over the lazy dog.", [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13])
EDGE_CASES = [
    "", " ", "   leading spaces", "trailing   ", "tabs\tand\nnew\n\nlines\r\n", "don't you'll we've I'M",
    "naïve café — “quotes” … 東京 🚀🚀 \u00a0nbsp", "numbers 1234567 3.14159 1e-10",
    "x" * 300, "  \n \n  mixed   whitespace \t\t end",
]


@pytest.fixture(scope="module")
def hf_tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def r50k_reference(tmp_path_factory):
    """tiktoken's own registry r50k_base, fed the verified file through its documented cache (independent path)."""
    import os

    import tiktoken
    import tiktoken.registry

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    shutil.copy(assets.gpt2_tiktoken_path(), cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        tiktoken.registry.ENCODINGS.pop("r50k_base", None)
        enc = tiktoken.get_encoding("r50k_base")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return enc


def test_asset_sha256():
    digest = hashlib.sha256(assets.gpt2_tiktoken_path().read_bytes()).hexdigest()
    assert digest == assets.GPT2_TIKTOKEN_SHA256


def test_constants(hf_tok):
    assert (EOS_ID, BOS_ID, MASK_ID, PAD_ID, VOCAB_SIZE) == (50256, 50256, 50257, 50257, 50258)
    assert len(hf_tok) == VOCAB_SIZE
    assert hf_tok.mask_token == "[MASK]" and hf_tok.mask_token_id == MASK_ID
    assert hf_tok.pad_token_id == MASK_ID and hf_tok.eos_token_id == EOS_ID and hf_tok.bos_token_id == BOS_ID
    assert hf_tok.convert_ids_to_tokens([262, EOS_ID, MASK_ID]) == ["Ġthe", "<|endoftext|>", "[MASK]"]
    assert hf_tok.encode("a[MASK]b", add_special_tokens=False) == [64, MASK_ID, 65]
    assert get_encoding().n_vocab == 50257


@pytest.mark.parametrize("text,ids", [HELLO, FOX])
def test_known_ids(text, ids, hf_tok, r50k_reference):
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert get_encoding().encode_ordinary(text) == ids
    assert r50k_reference.encode_ordinary(text) == ids


def test_hf_files_match_gpt2_layout():
    d = gpt2_tokenizer_dir()
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == 50257 and vocab["Ġthe"] == 262 and vocab["<|endoftext|>"] == 50256 and vocab["!"] == 0
    merges = (d / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 50000
    assert merges[1:8] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he"]
    # each merge's two halves concatenate to the token of the same rank
    inv = {v: k for k, v in vocab.items()}
    for rank in (256, 1000, 30000, 50255):
        a, b = merges[rank - 255].split(" ")
        assert a + b == inv[rank]


def test_pattern_is_tiktoken_r50k():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert R50K_PATTERN == r50k_pat_str


def test_round_trip_and_paths_agree(hf_tok, r50k_reference):
    enc = get_encoding()
    texts = list(EDGE_CASES)
    for doc in load_classics("validation"):  # Persuasion, Revelation, The Tempest: ~0.6 MB of real text
        texts += [doc["text"][i:i + 20000] for i in range(0, min(len(doc["text"]), 200000), 20000)]
    ours = enc.encode_ordinary_batch(texts)
    assert ours == [r50k_reference.encode_ordinary(t) for t in texts]
    assert ours == [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    for text, ids in zip(texts, ours, strict=True):
        assert enc.decode(ids) == text
        assert hf_tok.decode(ids) == text


def test_special_token_text(hf_tok):
    """Corpus text is encoded as plain text (tiktoken ``encode_ordinary``); HF maps the literal to EOS."""
    text = "<|endoftext|> is here"
    assert get_encoding().encode_ordinary(text) == [27, 91, 437, 1659, 5239, 91, 29, 318, 994]
    assert hf_tok.encode(text, add_special_tokens=False) == [EOS_ID, 318, 994]
    assert get_encoding().decode(get_encoding().encode_ordinary(text)) == text
