"""The exact GPT-2 byte-level BPE (Radford et al. 2019), built offline from ``gpt2.tiktoken``.

``gpt2.tiktoken`` (see :mod:`ddistill.data.assets`) lists the 50,256 mergeable byte strings with their ranks
(rank = token id). The HF files are derived from it:

* ``vocab.json``: token id -> the token's bytes mapped through GPT-2's ``bytes_to_unicode`` table, plus
  ``<|endoftext|>`` = 50256.
* ``merges.txt``: BPE merge ``r`` (for ranks r >= 256, the single bytes) is recovered by replaying BPE on
  token r's bytes with only the merges of rank < r; that leaves exactly two parts, whose concatenation is
  the merge of rank r. Merge order = rank order, as in the original GPT-2 ``merges.txt``.
* ``tokenizer.json``: ``tokenizers`` BPE model + ``ByteLevel(add_prefix_space=False)`` pre-tokenizer and
  decoder, special ``<|endoftext|>``.

Diffusion LMs add one absorbing/padding token: ``[MASK]`` = 50257, so the model vocabulary is 50,258
(MDLM/DUO, arXiv 2406.07524 / 2506.10892). ``get_encoding()`` returns a tiktoken ``Encoding`` with the
same ranks and the r50k pre-tokenisation regex, used for fast corpus tokenisation; both paths give
identical ids.

Tokenizers are named by ``data.tokenizer``: ``gpt2`` (above; the public checkpoints' vocabulary) or
``classics-bpe-<V>`` (a byte-level BPE of ``V`` ids trained on the classics train split,
:mod:`ddistill.data.classics_bpe`, for small CPU models). Every tokenizer ends with EOS (= BOS) and then
``[MASK]`` (= PAD): ``mask_id = V - 1`` is the last id, as the engine assumes. :func:`tokenizer_spec` gives
these ids from the name alone (no build), :func:`check_vocab_size` is the one model/tokenizer mismatch error.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ddistill.data.assets import cache_dir, gpt2_tiktoken_path, publish_dir

__all__ = [
    "TokenizerSpec",
    "tokenizer_spec",
    "check_vocab_size",
    "get_encoder",
    "BOS_ID",
    "EOS_ID",
    "MASK_ID",
    "PAD_ID",
    "VOCAB_SIZE",
    "GPT2_VOCAB_SIZE",
    "MASK_TOKEN",
    "bytes_to_unicode",
    "gpt2_tokenizer_dir",
    "get_tokenizer",
    "get_encoding",
    "tokenizer_fingerprint",
]

GPT2_VOCAB_SIZE = 50257
EOS_ID = BOS_ID = 50256
MASK_ID = PAD_ID = 50257
VOCAB_SIZE = 50258
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "[MASK]"
# tiktoken's r50k_base / GPT-2 pre-tokenisation pattern.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_FORMAT_VERSION = 1
CLASSICS_BPE = re.compile(r"^classics-bpe-(\d+)$")
CLASSICS_BPE_SIZES = (512, 65536)  # at least a few hundred merges; ids must fit the uint16 token cache
TOKENIZER_NAMES = ("gpt2", "classics-bpe-<V>")


@dataclass(frozen=True)
class TokenizerSpec:
    """The ids a tokenizer name implies: ``vocab_size`` ids, EOS (= BOS) and then [MASK] (= PAD) last."""

    name: str
    vocab_size: int

    @property
    def eos_id(self) -> int:
        return self.vocab_size - 2

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1


def tokenizer_spec(name: str) -> TokenizerSpec:
    """Validate a ``data.tokenizer`` name and return its ids (cheap: nothing is built or read)."""
    if name == "gpt2":
        return TokenizerSpec(name, VOCAB_SIZE)
    match = CLASSICS_BPE.match(name) if isinstance(name, str) else None
    lo, hi = CLASSICS_BPE_SIZES
    if match is None or not lo <= int(match.group(1)) <= hi:
        raise ValueError(f"tokenizer {name!r} is not known; allowed: 'gpt2' or 'classics-bpe-<V>' with "
                         f"{lo} <= V <= {hi} ids in all (e.g. 'classics-bpe-4096')")
    return TokenizerSpec(name, int(match.group(1)))


def check_vocab_size(name: str, vocab_size: int, *, what: str) -> TokenizerSpec:
    """Raise one ValueError when a model of ``vocab_size`` ids (``what`` names it) does not fit tokenizer ``name``."""
    spec = tokenizer_spec(name)
    if vocab_size != spec.vocab_size:
        raise ValueError(f"{what} has a vocabulary of {vocab_size} ids but its tokenizer {name!r} has "
                         f"{spec.vocab_size} (EOS {spec.eos_id}, [MASK] {spec.mask_id}); a model decodes only "
                         f"with the tokenizer it was trained with (model.vocab_size and data.tokenizer must agree)")
    return spec


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _split_in_two(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Replay BPE on ``token`` using only merges ranked below ``rank``; returns the final two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, best_at = r, i
        assert best is not None, f"token rank {rank} is not reachable by lower merges"
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


def _write_hf_files(ranks: dict[bytes, int], out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    b2u = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {to_str(tok): r for tok, r in ranks.items()}
    vocab[EOS_TOKEN] = EOS_ID
    merges = [_split_in_two(tok, r, ranks) for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256]
    merges_str = [(to_str(a), to_str(b)) for a, b in merges]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges_str))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges_str, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False,
              "bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}, indent=1))


@functools.cache
def gpt2_tokenizer_dir() -> Path:
    """Directory with the generated GPT-2 ``vocab.json``/``merges.txt``/``tokenizer.json`` (built once)."""

    def complete(root: Path) -> bool:
        return (root / "tokenizer.json").is_file() and (root / "COMPLETE").is_file()

    def build(tmp: Path) -> None:
        _write_hf_files(_load_ranks(gpt2_tiktoken_path()), tmp)
        (tmp / "COMPLETE").write_text(tokenizer_fingerprint())

    return publish_dir(cache_dir() / "tokenizers" / f"gpt2-v{_FORMAT_VERSION}", build, complete)


@functools.cache
def tokenizer_fingerprint(name: str = "gpt2") -> str:
    """Identifies the token ids of ``name``.

    GPT-2: the sha256 of the BPE ranks file plus the added-token layout; classics BPE: of its ``tokenizer.json``.
    """
    if tokenizer_spec(name).name != "gpt2":
        from ddistill.data.classics_bpe import classics_bpe_dir, fingerprint_of

        return fingerprint_of(classics_bpe_dir(tokenizer_spec(name).vocab_size) / "tokenizer.json")
    digest = hashlib.sha256(gpt2_tiktoken_path().read_bytes())
    digest.update(f"{EOS_ID},{MASK_ID},{VOCAB_SIZE},v{_FORMAT_VERSION}".encode())
    return digest.hexdigest()[:16]


def _hub_cached_gpt2():
    """The ``gpt2`` tokenizer from a local HF hub cache, or None (never touches the network)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
    except (OSError, ValueError):
        return None


def get_tokenizer(name: str = "gpt2"):
    """The fast tokenizer named ``name`` plus ``[MASK]`` (the last id, also the pad token).

    ``gpt2``: ``len == 50258``, from a locally cached hub ``gpt2`` when present, else the files generated from
    ``gpt2.tiktoken``. ``classics-bpe-<V>``: ``len == V``, trained on first use (:mod:`ddistill.data.classics_bpe`).
    """
    spec = tokenizer_spec(name)
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.name != "gpt2":
        from ddistill.data.classics_bpe import classics_bpe_dir

        tok = PreTrainedTokenizerFast(tokenizer_file=str(classics_bpe_dir(spec.vocab_size) / "tokenizer.json"),
                                      bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=None,
                                      mask_token=MASK_TOKEN, pad_token=MASK_TOKEN, model_max_length=1024)
        assert tok.eos_token_id == tok.bos_token_id == spec.eos_id and len(tok) == spec.vocab_size
        assert tok.mask_token_id == tok.pad_token_id == spec.mask_id
        return tok

    tok = _hub_cached_gpt2() or AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir()))
    assert isinstance(tok, PreTrainedTokenizerFast), type(tok)
    tok.add_special_tokens({"mask_token": MASK_TOKEN, "pad_token": MASK_TOKEN})
    tok.model_max_length = 1024
    assert tok.eos_token_id == EOS_ID and tok.bos_token_id == BOS_ID, (tok.eos_token_id, tok.bos_token_id)
    assert tok.mask_token_id == MASK_ID and tok.pad_token_id == PAD_ID and len(tok) == VOCAB_SIZE
    return tok


@functools.cache
def get_encoding():
    """tiktoken ``Encoding`` with GPT-2's ranks and regex (``[MASK]`` is not part of it; ids < 50257)."""
    import tiktoken

    ranks = _load_ranks(gpt2_tiktoken_path())
    return tiktoken.Encoding("gpt2-ddistill", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOS_TOKEN: EOS_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)


def get_encoder(name: str = "gpt2") -> Callable[[Sequence[str], int], list[list[int]]]:
    """``encode(texts, num_threads) -> ids`` of tokenizer ``name`` without special tokens (corpus tokenisation)."""
    spec = tokenizer_spec(name)
    if spec.name == "gpt2":
        enc = get_encoding()
        return lambda texts, num_threads: enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
    from tokenizers import Tokenizer

    from ddistill.data.classics_bpe import classics_bpe_dir

    # Without its added tokens, like tiktoken's encode_ordinary: "<|endoftext|>" in a document is plain text.
    layout = json.loads((classics_bpe_dir(spec.vocab_size) / "tokenizer.json").read_text())
    tok = Tokenizer.from_str(json.dumps({**layout, "added_tokens": []}))
    return lambda texts, num_threads: [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
