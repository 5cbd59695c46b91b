"""A small byte-level BPE trained on the classics TRAIN split: the vocabulary of the CPU demo models.

Byte-level BPE (Sennrich et al. 2016, arXiv 1508.07909; GPT-2's byte-level variant, Radford et al. 2019):
start from the 256 single bytes (GPT-2's ``bytes_to_unicode`` alphabet), split text with GPT-2's
pre-tokenisation regex, and repeatedly merge the most frequent adjacent pair of symbols until
``vocab_size - 2`` symbols exist (``tokenizers.trainers.BpeTrainer``, ``min_frequency=2``; it breaks ties
between equally frequent pairs by the pair itself, so training is deterministic). The two special ids are
then appended, so they are the last two ids, as the engine expects ([MASK] = the last id):

    id vocab_size - 2 = ``<|endoftext|>`` (BOS = EOS, as GPT-2)      id vocab_size - 1 = ``[MASK]`` (= PAD)

With ``vocab_size = 4096`` the DiT's output layer is ~12x narrower than GPT-2's 50,258 columns, which is
what dominates the cost of a ``test``-size DiT on a CPU.

The trained tokenizer lives in ``cache_dir()/tokenizers/classics-bpe-<V>-<corpus sha256[:16]>-v<format>/``
(``tokenizer.json`` plus a ``COMPLETE`` marker holding its fingerprint), built atomically with
:func:`ddistill.data.assets.publish_dir`: the directory is keyed by the TRAIN split's content and the vocabulary
size, never by its path, so a cache copied to another machine is reused. Only the train split is read: the
held-out works never shape the vocabulary.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from ddistill.data import classics
from ddistill.data.assets import cache_dir, publish_dir, sha256_file
from ddistill.data.tokenizer import EOS_TOKEN, MASK_TOKEN

__all__ = ["classics_bpe_dir", "fingerprint_of", "train_bpe"]

MIN_FREQUENCY = 2
_FORMAT_VERSION = 1


def train_bpe(texts: Sequence[str], vocab_size: int):
    """A ``tokenizers.Tokenizer``: byte-level BPE with ``vocab_size - 2`` learned symbols, then EOS, [MASK].

    Raises ValueError when ``texts`` are too small to learn ``vocab_size - 2`` symbols (the ids must be exact).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, min_frequency=MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    learned = tok.get_vocab_size()
    if learned != vocab_size - 2:
        raise ValueError(f"byte-level BPE: the corpus gives only {learned} symbols (pairs seen at least "
                         f"{MIN_FREQUENCY} times), fewer than the {vocab_size - 2} that vocab_size={vocab_size} needs")
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False),
                            AddedToken(MASK_TOKEN, special=True, normalized=False)])
    assert tok.token_to_id(EOS_TOKEN) == vocab_size - 2 and tok.token_to_id(MASK_TOKEN) == vocab_size - 1
    return tok


def fingerprint_of(tokenizer_json: Path) -> str:
    """Identifies the token ids: sha256 of the saved ``tokenizer.json`` (vocabulary, merges, special ids)."""
    return sha256_file(tokenizer_json)[:16]


@functools.cache
def _train_split_sha256(path: Path) -> str:
    return sha256_file(path)


def classics_bpe_dir(vocab_size: int) -> Path:
    """The cached tokenizer directory for ``vocab_size`` (trained on first use from the classics train split)."""
    train_file = classics.classics_files()["train"]
    corpus_sha = _train_split_sha256(train_file)

    def complete(root: Path) -> bool:
        marker, tok_file = root / "COMPLETE", root / "tokenizer.json"
        return marker.is_file() and tok_file.is_file() and marker.read_text() == fingerprint_of(tok_file)

    def build(tmp: Path) -> None:
        with open(train_file, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        train_bpe(texts, vocab_size).save(str(tmp / "tokenizer.json"))
        (tmp / "COMPLETE").write_text(fingerprint_of(tmp / "tokenizer.json"))

    name = f"classics-bpe-{vocab_size}-{corpus_sha[:16]}-v{_FORMAT_VERSION}"
    return publish_dir(cache_dir() / "tokenizers" / name, build, complete)
