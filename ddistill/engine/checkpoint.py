"""Atomic, verifiable training checkpoints: one directory per step.

    <out_dir>/checkpoints/step_00001000/
        ds/<network>/state/...        every trained engine's DeepSpeed state (module, its own ZeRO optimizer partitions)
        ema/<network>.pt              EMA shadow weights, decay, update count
        frozen/<network>.pt           frozen networks' CURRENT weights (a swapped teacher survives a resume); written
                                      at the first checkpoint after a change, then hard-linked (or copied) by the
                                      next ones, so each directory stays complete and pruning never breaks one
        trainer.pt                    step, counters (incl. optimizer updates per network), method state
        rank_00000.pt ...             per rank: loader position, RNG states (python, numpy, torch CPU, CUDA)
        config.yaml                   the resolved run config (enough to relaunch; a relaunch is compared with it,
                                      see relaunch.py)
        MANIFEST.json                 sha256 + size of every file above, written LAST

Writing: all ranks write into ``step_XXXXXXXX.tmp``; after a barrier rank 0 hashes every file, writes the manifest
and renames the directory into place, so a directory without the ``.tmp`` suffix is complete unless damaged later.
Reading: the newest directory whose manifest exists and matches every file is used; damaged ones are reported by
name and skipped. The directory must be on a filesystem shared by all ranks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from ddistill.data.assets import sha256_file

__all__ = ["MANIFEST", "checkpoint_dir", "list_checkpoints", "verify_checkpoint", "find_latest_valid",
           "write_manifest", "finalize", "prune", "CorruptCheckpointError"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^step_(\d{8,})$")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint directory is incomplete or its files do not match the manifest."""


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (no .tmp) under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def write_manifest(directory: Path, step: int) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}
    tmp = directory / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"step": step, "files": entries}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def verify_checkpoint(directory: Path) -> int:
    """Return the step of a complete checkpoint; raise CorruptCheckpointError saying what is wrong."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CorruptCheckpointError(f"{directory.name}: no {MANIFEST} (incomplete write)")
    try:
        data = json.loads(manifest.read_text())
        entries = data["files"]
    except (ValueError, KeyError) as err:
        raise CorruptCheckpointError(f"{directory.name}: unreadable {MANIFEST}: {err}") from err
    for rel, entry in entries.items():
        path = directory / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory.name}: missing file {rel}")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"{directory.name}: checksum mismatch for {rel}")
    return int(data["step"])


def find_latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """Newest valid checkpoint under root (or None) and the problems found in newer, damaged ones."""
    problems: list[str] = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            problems.append(str(err))
            log.warning("skipping damaged checkpoint: %s", err)
            continue
        return path, problems
    return None, problems


def finalize(tmp_dir: Path, final_dir: Path, step: int) -> None:
    """Rank 0, after every rank finished writing into tmp_dir: manifest last, then rename into place."""
    write_manifest(tmp_dir, step)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoint directories, and stale .tmp ones; returns what was deleted."""
    removed = []
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for path in Path(root).glob("step_*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
