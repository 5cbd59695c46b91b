"""Run every fused-loss benchmark (MDLM, distillation reverse KL, uniform ELBO) and print the issue's targets.

    python benchmarks/bench_kernels.py               # default sweep, < 4 min on an H100
    python benchmarks/bench_kernels.py --quick       # N=16384, d=768 only (~1 min)
    python benchmarks/bench_kernels.py --table-only  # regenerate results/kernels.md from results/kernels.csv

Results are appended to benchmarks/results/kernels.csv (keyed by GPU, torch/triton version, git revision) and
benchmarks/results/kernels.md is regenerated.
"""

from __future__ import annotations

import bench_distill_loss
import bench_mdlm_loss
import bench_uniform_elbo
from harness import chunk_sizes, parse_args, ratio_report, run_cases, shapes_from, write_markdown


def main() -> None:
    args = parse_args(__doc__)
    if args.table_only:
        write_markdown()
        return
    shapes = shapes_from(args)
    sizes = chunk_sizes(args)
    cases = (
        bench_mdlm_loss.cases(shapes, args.compile_all, sizes)
        + bench_distill_loss.cases(shapes, args.compile_all, args.kind, sizes)
        + bench_uniform_elbo.cases(shapes, args.compile_all, sizes)
    )
    rows = run_cases(cases, args)
    report = ratio_report(rows, "mdlm", 16384, 768, bench_mdlm_loss.TARGETS)
    report += ratio_report(rows, f"distill_{args.kind}", 16384, 768, bench_distill_loss.TARGETS)
    report += ratio_report(rows, "uniform_elbo", 16384, 768, bench_uniform_elbo.TARGETS)
    print("\n".join(report))


if __name__ == "__main__":
    main()
