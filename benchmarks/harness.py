"""Shared benchmark harness for the fused-loss kernels (timing, memory, float64 error, CSV/Markdown results).

Timing: median of ``triton.testing.do_bench`` (L2 flushed between reps) for forward, backward (retained graph) and
full (forward + backward). Memory: ``torch.cuda.max_memory_allocated()`` during one full step minus the allocation
before it (inputs excluded; produced gradients included, once: the kernels.csv rows up to revision 781ca03 also
counted the harness's own copy of the gradients wherever that copy made the peak: the Triton MDLM and KL rows'
0.205 GB at N = 16384, d = 768 is twice their 0.10 GB of gradients). Error: relative L2 error of the loss and of
d_hidden / d_weight against a float64 evaluation of the same loss on the first ``ERROR_ROWS`` rows (float64 on all
rows would take minutes at these shapes). Every row of ``results/kernels.csv`` records the GPU, torch/triton versions
and git rev.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "results"
CSV_PATH = RESULTS / "kernels.csv"
MD_PATH = RESULTS / "kernels.md"
VOCAB = 50258
VOCAB_PAD = 50304
ERROR_ROWS = 512
DEFAULT_SHAPES = [(4096, 768), (16384, 768), (65536, 768), (16384, 1024), (16384, 1536)]
QUICK_SHAPES = [(16384, 768)]
FIELDS = [
    "timestamp", "gpu", "torch", "triton", "git_rev", "loss", "method", "N", "d", "V", "V_pad", "dtype",
    "fwd_ms", "bwd_ms", "full_ms", "peak_mem_gb", "rel_err_loss", "rel_err_dh", "rel_err_dw", "status",
]  # fmt: skip


@dataclass
class Case:
    """One loss at one shape: ``make_inputs(rows)`` builds (grad_leaves, consts); methods map name -> loss fn."""

    loss: str
    n: int
    d: int
    make_inputs: Callable[[int | None], tuple[list[torch.Tensor], dict]]
    methods: dict[str, Callable[..., torch.Tensor] | str]
    oracle: Callable[..., torch.Tensor]
    extra: dict = field(default_factory=dict)


def git_revision() -> str:
    """``$DDISTILL_GIT_REV`` when set (a copy of the tree sent to a GPU machine, whose .git may be stale or absent),
    else the short git revision, ``+dirty`` when ddistill/ has uncommitted changes."""
    if os.environ.get("DDISTILL_GIT_REV"):
        return os.environ["DDISTILL_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "ddistill"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): before and after a timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment() -> dict[str, str]:
    import triton

    return dict(
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        git_rev=git_revision(),
    )


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="only N=16384, d=768")
    parser.add_argument("--shapes", type=str, default=None, help="comma-separated NxD list, e.g. 4096x768,16384x1024")
    parser.add_argument("--methods", type=str, default=None, help="comma-separated subset of methods")
    parser.add_argument("--compile-all", action="store_true", help="run torch.compile at every shape (slow)")
    parser.add_argument("--no-error", action="store_true", help="skip the float64 error measurement")
    parser.add_argument("--table-only", action="store_true", help="only regenerate results/kernels.md from the CSV")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/kernels.csv")
    parser.add_argument("--chunk-rows", type=str, default=None,
                        help="comma-separated rows per chunk: adds a method chunked-<C> per value (impl='chunked')")
    parser.add_argument("--kind", default="kl_rev", choices=["kl_fwd", "kl_rev", "jsd", "tvd"], help="distillation divergence")
    return parser.parse_args()


def parse_shape(text: str) -> tuple[int, int]:
    """``"NxD"`` -> (N, D); anything else stops the script with a message naming the item."""
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"shape {text!r}: expected NxD with two integers, e.g. 16384x768") from None
    return n, d


def shapes_from(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.shapes:
        return [parse_shape(item) for item in args.shapes.split(",")]
    return QUICK_SHAPES if args.quick else DEFAULT_SHAPES


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return float("nan")
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def _run_once(fn, leaves, consts):
    for t in leaves:
        t.grad = None
    loss = fn(*leaves, **consts)
    loss.backward()
    return loss.detach(), [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def measure(case: Case, name: str, fn, check_error: bool) -> dict:
    from triton.testing import do_bench

    row = dict(loss=case.loss, method=name, N=case.n, d=case.d, V=VOCAB, V_pad=VOCAB_PAD, dtype="bf16")
    if isinstance(fn, str):  # a reason the method cannot run ("not installed", ...)
        return row | dict(status=fn)
    try:
        if check_error:
            leaves, consts = case.make_inputs(ERROR_ROWS)
            loss, grads = _run_once(fn, leaves, consts)
            leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
            consts64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in consts.items()}
            loss64, grads64 = _run_once(case.oracle, leaves64, consts64)
            row |= dict(rel_err_loss=_rel(loss, loss64), rel_err_dh=_rel(grads[0], grads64[0]), rel_err_dw=_rel(grads[1], grads64[1]))
            del leaves, leaves64, grads, grads64
        leaves, consts = case.make_inputs(None)
        _run_once(fn, leaves, consts)  # warm-up: autotuning / compilation outside the measurements
        torch.cuda.synchronize()
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*leaves, **consts).backward()  # not _run_once: its copies of the gradients are not the loss's memory
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        fwd = do_bench(lambda: fn(*leaves, **consts), grad_to_none=leaves, return_mode="median")
        loss = fn(*leaves, **consts)
        bwd = do_bench(lambda: loss.backward(retain_graph=True), grad_to_none=leaves, return_mode="median")
        del loss
        full = do_bench(lambda: fn(*leaves, **consts).backward(), grad_to_none=leaves, return_mode="median")
        row |= dict(fwd_ms=fwd, bwd_ms=bwd, full_ms=full, peak_mem_gb=peak, status="ok" + getattr(fn, "note", ""))
    except torch.OutOfMemoryError:
        row |= dict(status="OOM")
    except Exception as exc:  # a failing baseline must not stop the sweep; the reason lands in the CSV
        traceback.print_exc()
        row |= dict(status=f"error: {type(exc).__name__}: {str(exc)[:120]}")
    finally:
        torch.cuda.empty_cache()
    return row


def run_cases(cases: list[Case], args: argparse.Namespace) -> list[dict]:
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    wanted = None if args.methods is None else set(args.methods.split(","))
    rows = []
    for case in cases:
        case_rows = []
        for name, fn in case.methods.items():
            if wanted is not None and name not in wanted:
                continue
            row = measure(case, name, fn, check_error=not args.no_error)
            case_rows.append({"timestamp": stamp, **env, **row})
            print(format_row(case_rows[-1]), flush=True)
        if not args.no_save:  # saved shape by shape: a sweep cut short keeps what it measured
            append_csv(case_rows)
            write_markdown()
        rows += case_rows
    return rows


def format_row(row: dict) -> str:
    def f(key, fmt):
        v = row.get(key)
        return "-" if v is None or v == "" else format(float(v), fmt)

    return (
        f"{row['loss']:>13} {row['method']:>10} N={row['N']:>6} d={row['d']:>5} fwd {f('fwd_ms', '8.3f')} "
        f"bwd {f('bwd_ms', '8.3f')} full {f('full_ms', '8.3f')} ms  mem {f('peak_mem_gb', '7.3f')} GB  "
        f"err loss {f('rel_err_loss', '.1e')} dh {f('rel_err_dh', '.1e')} dW {f('rel_err_dw', '.1e')}  {row.get('status')}"
    )


def append_csv(rows: list[dict], path: Path = CSV_PATH, fields: list[str] = FIELDS) -> None:
    """Append ``rows`` (missing fields left empty) to a results CSV, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def read_csv() -> list[dict]:
    if not CSV_PATH.exists():
        return []
    with CSV_PATH.open() as fh:
        return list(csv.DictReader(fh))


def write_markdown() -> None:
    """Regenerate results/kernels.md: the latest measurement of each (gpu, loss, method, N, d)."""
    latest: dict[tuple, dict] = {}
    for row in read_csv():
        latest[(row["gpu"], row["loss"], row["method"], int(row["N"]), int(row["d"]))] = row
    lines = ["# Fused-loss kernel benchmarks", "",
             "Generated from `kernels.csv` by `python benchmarks/bench_kernels.py --table-only`; latest run per key.",
             "bf16 inputs, V = 50258 (padded 50304); times are medians of `triton.testing.do_bench`; memory is the "
             "peak allocation of one forward+backward above the inputs, the produced gradients included (rows up to "
             "781ca03 also counted the harness's copy of them where that copy made the peak: the Triton MDLM and KL "
             "rows' 0.205 GB at N = 16384, d = 768 is twice their 0.10 GB of gradients); × eager is the eager row's "
             "full time over this "
             "row's (same card, loss and shape); errors are relative L2 vs float64 "
             f"on the first {ERROR_ROWS} rows. `chunked` forms the gradient in the forward (its bwd only scales).", ""]  # fmt: skip
    for gpu in sorted({k[0] for k in latest}):
        lines += [f"## {gpu}", "", "| loss | method | N | d | fwd ms | bwd ms | full ms | × eager | peak GB | err loss | err dh | err dW | status | rev | torch | triton |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for key in sorted(k for k in latest if k[0] == gpu):
            r = latest[key]

            def f(k, fmt):
                return format(float(r[k]), fmt) if r.get(k) not in (None, "") else "-"

            eager = latest.get((gpu, key[1], "eager", key[3], key[4]), {})
            speedup = (f"{float(eager['full_ms']) / float(r['full_ms']):.2f}"
                       if eager.get("full_ms") not in (None, "") and r.get("full_ms") not in (None, "") else "-")  # fmt: skip
            lines.append(
                f"| {r['loss']} | {r['method']} | {r['N']} | {r['d']} | {f('fwd_ms', '.3f')} | {f('bwd_ms', '.3f')} | "
                f"{f('full_ms', '.3f')} | {speedup} | {f('peak_mem_gb', '.3f')} | {f('rel_err_loss', '.1e')} | {f('rel_err_dh', '.1e')} | "
                f"{f('rel_err_dw', '.1e')} | {r['status']} | {r['git_rev']} | {r['torch']} | {r['triton']} |"
            )
        lines.append("")
    RESULTS.mkdir(parents=True, exist_ok=True)
    MD_PATH.write_text("\n".join(lines))


def chunk_sizes(args: argparse.Namespace) -> list[int]:
    """The ``--chunk-rows`` values (each a positive integer), or none."""
    if not args.chunk_rows:
        return []
    try:
        sizes = [int(v) for v in args.chunk_rows.split(",")]
    except ValueError:
        raise SystemExit(f"--chunk-rows {args.chunk_rows!r}: expected comma-separated integers, e.g. 1024,2048") from None
    if any(c < 1 for c in sizes):
        raise SystemExit(f"--chunk-rows {args.chunk_rows!r}: every value must be >= 1")
    return sizes


OUR_METHODS = ("triton", "chunked")


def ratio_report(rows: list[dict], loss: str, n: int, d: int, targets: list[tuple[str, str, float]]) -> list[str]:
    """Check target ratios at one shape for each of our methods (the Triton kernels and the chunked path, plus any
    ``chunked-<C>`` sweep). targets: (kind, method, value) with kind in {full_ms, speedup, mem_gb}."""
    at = {r["method"]: r for r in rows if r["loss"] == loss and int(r["N"]) == n and int(r["d"]) == d and str(r.get("status", "")).startswith("ok")}
    out = []
    for name in [m for m in at if m in OUR_METHODS or m.startswith("chunked-")] or ["triton"]:
        out += _ratio_lines(at, name, loss, n, d, targets)
    return out


def _ratio_lines(at: dict, name: str, loss: str, n: int, d: int, targets: list[tuple[str, str, float]]) -> list[str]:
    ours = at.get(name)
    out = [f"targets for {loss} / {name} at N={n}, d={d}:"]
    if ours is None:
        return out + [f"  {name} result missing"]
    for kind, method, value in targets:
        if kind == "full_ms":
            ok = ours["full_ms"] <= value
            out.append(f"  full {ours['full_ms']:.3f} ms <= {value} ms: {'PASS' if ok else 'FAIL'}")
        elif kind == "mem_gb":
            ok = ours["peak_mem_gb"] <= value
            out.append(f"  extra memory {ours['peak_mem_gb']:.3f} GB <= {value} GB: {'PASS' if ok else 'FAIL'}")
        elif kind == "speedup":
            other = at.get(method)
            if other is None:
                out.append(f"  vs {method}: not measured")
                continue
            speedup = other["full_ms"] / ours["full_ms"]
            ok = speedup >= value
            out.append(f"  {speedup:.2f}x faster than {method} (target >= {value}x): {'PASS' if ok else 'FAIL'}")
    return out


def optional_import(module: str):
    try:
        return __import__(module, fromlist=["_"]), None
    except ImportError:
        return None, "not installed"


def maybe_compile(fn, enabled: bool):
    if not enabled:
        return "skipped (use --compile-all)"
    # the backward is timed with retain_graph=True, which compiled graphs with donated buffers refuse
    torch._functorch.config.donated_buffer = False
    return torch.compile(fn)
