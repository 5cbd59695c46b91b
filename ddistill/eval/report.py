"""Result tables (CSV + Markdown) and the Gen-PPL / entropy vs sampling-steps plot.

One row per (label, steps): label names the model or distillation round (e.g. ``"teacher"``, ``"round 3"``);
the plot draws one curve per label, Gen PPL on a log y axis and entropy on a linear one, both against the number
of sampling steps on a log2 x axis (as in DUO arXiv 2506.10892 Table/Fig. of Gen PPL vs T), with the bootstrap
intervals over samples (``*_lo``/``*_hi``, see ``metrics.gen_ppl_interval``) as error bars where a row has them.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence


@dataclass(kw_only=True)
class EvalRow:
    """Sample-quality numbers of one sampler configuration; ``device`` says what it was measured on."""

    label: str
    steps: int
    nfe: float
    gen_ppl: float
    entropy: float
    mauve: float | None = None
    distinct_2: float | None = None  # batch diversity (eval.metrics.distinct_n / duplicate_fraction)
    distinct_3: float | None = None
    distinct_4: float | None = None
    duplicate_frac: float | None = None
    num_samples: int
    judge: str
    device: str
    sample_seconds: float | None = None
    gen_ppl_lo: float | None = None  # 95% bootstrap interval over samples
    gen_ppl_hi: float | None = None
    entropy_lo: float | None = None
    entropy_hi: float | None = None
    # Gen PPL over a reference row's (the demo: the teacher at the same steps and tail), with its 95% bootstrap
    # interval (eval.metrics.gen_ppl_ratio_interval)
    ppl_ratio: float | None = None
    ppl_ratio_lo: float | None = None
    ppl_ratio_hi: float | None = None
    # how that interval resampled: "paired" (both sets drawn with the same random numbers, one resample of the
    # sample indices for both) or "independent" (each set resampled on its own); "" without a ratio
    ppl_ratio_bootstrap: str = ""


COLUMNS = tuple(f.name for f in fields(EvalRow))
_INT_COLUMNS = {"steps", "num_samples"}
_FLOAT_COLUMNS = {"nfe", "gen_ppl", "entropy", "mauve", "sample_seconds", "gen_ppl_lo", "gen_ppl_hi", "entropy_lo",
                  "entropy_hi", "distinct_2", "distinct_3", "distinct_4", "duplicate_frac", "ppl_ratio", "ppl_ratio_lo",
                  "ppl_ratio_hi"}
_INTERVALS = {"gen_ppl": ("gen_ppl_lo", "gen_ppl_hi", ".2f"), "entropy": ("entropy_lo", "entropy_hi", ".3f"),
              "ppl_ratio": ("ppl_ratio_lo", "ppl_ratio_hi", ".3f")}
_MARKDOWN_COLUMNS = tuple(c for c in COLUMNS if c not in {lo for lo, _, _ in _INTERVALS.values()}
                          and c not in {hi for _, hi, _ in _INTERVALS.values()})


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows: Sequence[EvalRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(v) for k, v in asdict(row).items()})
    return path


def read_csv(path: str | Path) -> list[EvalRow]:
    rows = []
    with Path(path).open(newline="") as f:
        for record in csv.DictReader(f):
            values = {}
            for key in COLUMNS:
                raw = record.get(key, "") or ""
                if key in _INT_COLUMNS:
                    values[key] = int(raw)
                elif key in _FLOAT_COLUMNS:
                    values[key] = float(raw) if raw != "" else None
                else:
                    values[key] = raw
            rows.append(EvalRow(**values))
    return rows


def _cell(row: EvalRow, key: str) -> str:
    value = getattr(row, key)
    if value is None:
        return "–"
    if key in _INTERVALS:
        lo_key, hi_key, spec = _INTERVALS[key]
        lo, hi = getattr(row, lo_key), getattr(row, hi_key)
        text = format(value, spec)
        return text if lo is None or hi is None else f"{text} [{lo:{spec}}, {hi:{spec}}]"
    if key in ("mauve", "distinct_2", "distinct_3", "distinct_4", "duplicate_frac"):
        return f"{value:.3f}"
    if key == "sample_seconds":
        return f"{value:.1f}"
    return _format(value)


def markdown_table(rows: Sequence[EvalRow]) -> str:
    """One line per row; Gen PPL and entropy carry their 95% bootstrap interval in brackets where known."""
    header = "| " + " | ".join(_MARKDOWN_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in _MARKDOWN_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key) for key in _MARKDOWN_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(rows: Sequence[EvalRow], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(rows))
    return path


def plot_curves(rows: Sequence[EvalRow], path: str | Path, *, title: str | None = None) -> Path:
    """PNG with Gen PPL (log y) and entropy vs steps (log2 x), one curve per label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_ppl, ax_ent = fig.subplots(1, 2)
    for label in dict.fromkeys(r.label for r in rows):
        curve = sorted((r for r in rows if r.label == label), key=lambda r: r.steps)
        steps = [r.steps for r in curve]
        for ax, key in ((ax_ppl, "gen_ppl"), (ax_ent, "entropy")):
            values = [getattr(r, key) for r in curve]
            lo_key, hi_key, _ = _INTERVALS[key]
            bounds = [(getattr(r, lo_key), getattr(r, hi_key)) for r in curve]
            if all(lo is not None and hi is not None for lo, hi in bounds):
                errors = [[v - lo for v, (lo, _) in zip(values, bounds)], [hi - v for v, (_, hi) in zip(values, bounds)]]
                ax.errorbar(steps, values, yerr=errors, marker="o", capsize=3, label=label)
            else:
                ax.plot(steps, values, marker="o", label=label)
    for ax, ylabel in ((ax_ppl, "Gen PPL"), (ax_ent, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_ppl.set_yscale("log")
    ax_ppl.legend()
    if any(r.gen_ppl_lo is not None for r in rows):
        ax_ent.set_title("error bars: 95% bootstrap intervals over samples", fontsize=8)
    judges = sorted({r.judge for r in rows})
    devices = sorted({r.device for r in rows})
    fig.suptitle(title or f"judge: {', '.join(judges)}; sampled on {', '.join(devices)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def merge_rows(old: Iterable[EvalRow], new: Iterable[EvalRow]) -> list[EvalRow]:
    """``old`` rows with those of the same (label, steps) replaced by ``new``; sorted by label order, then steps."""
    merged = {(r.label, r.steps): r for r in old}
    merged.update({(r.label, r.steps): r for r in new})
    order = {label: i for i, label in enumerate(dict.fromkeys(label for label, _ in merged))}
    return sorted(merged.values(), key=lambda r: (order[r.label], r.steps))


def write_report(
    rows: Sequence[EvalRow], out_dir: str | Path, *, stem: str = "sample_eval", merge: bool = True
) -> dict[str, Path]:
    """Write ``{stem}.csv``, ``{stem}.md`` and ``{stem}.png`` in ``out_dir``.

    With ``merge`` the rows already in ``{stem}.csv`` are kept (same (label, steps) replaced), so successive
    rounds accumulate into one table and one plot.
    """
    out_dir = Path(out_dir)
    csv_path = out_dir / f"{stem}.csv"
    if merge and csv_path.exists():
        rows = merge_rows(read_csv(csv_path), rows)
    else:
        rows = merge_rows([], rows)
    return {
        "csv": write_csv(rows, csv_path),
        "md": write_markdown(rows, out_dir / f"{stem}.md"),
        "png": plot_curves(rows, out_dir / f"{stem}.png"),
    }
