"""CSV / Markdown / PNG report writing and merging across labels."""

from __future__ import annotations

import csv

import pytest

from ddistill.eval.report import COLUMNS, EvalRow, markdown_table, read_csv, write_report


def _rows(label, ppl_scale, mauve=None):
    return [
        EvalRow(
            label=label,
            steps=steps,
            nfe=steps + 1.0,
            gen_ppl=ppl_scale * 1000.0 / steps,
            entropy=5.0 + 0.01 * steps,
            mauve=mauve,
            num_samples=16,
            judge="smollm2",
            device="cpu",
            sample_seconds=0.5 * steps,
        )
        for steps in (32, 8, 16)
    ]


def test_report_files_and_content(tmp_path):
    paths = write_report(_rows("teacher", 1.0, mauve=0.9), tmp_path)
    assert {p.name for p in paths.values()} == {"sample_eval.csv", "sample_eval.md", "sample_eval.png"}
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    with paths["csv"].open() as f:
        records = list(csv.DictReader(f))
    assert tuple(records[0]) == COLUMNS
    assert [r["steps"] for r in records] == ["8", "16", "32"]  # sorted by steps within a label
    assert float(records[0]["gen_ppl"]) == pytest.approx(125.0)
    assert records[0]["mauve"] == "0.9" and records[0]["nfe"] == "9"

    md = paths["md"].read_text().splitlines()
    assert md[0] == "| " + " | ".join(c for c in COLUMNS if not c.endswith(("_lo", "_hi"))) + " |"
    assert md[2].split(" | ")[:5] == ["| teacher", "8", "9", "125.00", "5.080"]
    assert len(md) == 2 + 3


def test_report_merges_rounds_and_replaces_same_steps(tmp_path):
    write_report(_rows("teacher", 1.0), tmp_path)
    write_report(_rows("round 1", 0.5)[:2], tmp_path)
    paths = write_report([_rows("teacher", 2.0)[0]], tmp_path)  # re-run of teacher at T=32
    rows = read_csv(paths["csv"])
    assert [(r.label, r.steps) for r in rows] == [
        ("teacher", 8),
        ("teacher", 16),
        ("teacher", 32),
        ("round 1", 8),
        ("round 1", 32),
    ]
    assert rows[2].gen_ppl == pytest.approx(2000.0 / 32)
    assert rows[0].mauve is None and "–" in markdown_table(rows)
    assert paths["png"].stat().st_size > 5000


def test_no_merge_overwrites(tmp_path):
    write_report(_rows("teacher", 1.0), tmp_path)
    paths = write_report(_rows("student", 1.0), tmp_path, merge=False)
    assert {r.label for r in read_csv(paths["csv"])} == {"student"}
