"""Where a fused loss spends its time: torch.profiler's per-kernel GPU table for one forward + backward.

    python benchmarks/profile_kernels.py                          # all three losses at N=16384, d=768
    python benchmarks/profile_kernels.py --loss mdlm --shape 65536x768 --method eager

Uses the inputs of the benchmark cases (bench_{mdlm_loss,distill_loss,uniform_elbo}.py); one warm-up step
(autotuning, compilation) runs first, then ``--steps`` profiled steps. The table lists the GPU kernels by total time,
which tells the stats / dZ Triton kernels apart from the cuBLAS dW / dH GEMMs and the glue (gathers, casts, sums).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import bench_distill_loss
import bench_mdlm_loss
import bench_uniform_elbo
from harness import parse_shape

CASES = {
    "mdlm": lambda shape: bench_mdlm_loss.cases([shape], False)[0],
    "distill": lambda shape: bench_distill_loss.cases([shape], False)[0],
    "elbo": lambda shape: bench_uniform_elbo.cases([shape], False)[0],
}


def profile_case(case, method: str, steps: int, rows: int) -> str:
    fn = case.methods[method]
    if isinstance(fn, str):
        return f"{case.loss}/{method}: {fn}"
    leaves, consts = case.make_inputs(None)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves, **consts).backward()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    return f"== {case.loss} / {method} at N={case.n}, d={case.d}, {steps} steps ==\n{table}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=[*CASES, "all"], default="all")
    p.add_argument("--shape", default="16384x768", help="NxD")
    p.add_argument("--method", default="triton")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=15, help="kernels listed per table")
    args = p.parse_args()
    shape = parse_shape(args.shape)
    cases = [CASES[loss](shape) for loss in (CASES if args.loss == "all" else [args.loss])]
    for case in cases:
        if args.method not in case.methods:
            raise SystemExit(f"--method {args.method!r}: the {case.loss} benchmark has {sorted(case.methods)}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels.py needs a CUDA GPU")
    for case in cases:
        print(profile_case(case, args.method, args.steps, args.rows), flush=True)


if __name__ == "__main__":
    main()
