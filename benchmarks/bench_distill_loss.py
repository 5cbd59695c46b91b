"""Benchmark the fused two-linear distillation loss (reverse KL, SDTT/DUO ``kl-bwd``) against torch eager,
torch.compile and Liger's LigerFusedLinearJSD (β = 1, its reverse-KL special case).

    python benchmarks/bench_distill_loss.py            # default sweep (< 4 min on an H100 together with the others)
    python benchmarks/bench_distill_loss.py --quick    # N=16384, d=768 only
    python benchmarks/bench_distill_loss.py --kind jsd # another divergence (kl_fwd, kl_rev, jsd, tvd)

Setting: every row distilled (DUO-style; SDTT would pass only masked rows), teacher of the same width as the
student, no bias (Liger's fused JSD has none), teacher logits kept fp32 until the difference in our kernel.
"""

from __future__ import annotations

import functools

import torch

from harness import VOCAB, VOCAB_PAD, Case, chunk_sizes, maybe_compile, optional_import, parse_args, ratio_report, run_cases, shapes_from, write_markdown

from ddistill.kernels import distill_loss
from ddistill.kernels.reference import distill_loss_reference

def make_inputs_factory(n: int, d: int):
    def make(rows: int | None):
        g = torch.Generator(device="cuda").manual_seed(0)
        m = n if rows is None else min(rows, n)
        hidden = torch.randn(m, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
        weight = (torch.randn(VOCAB_PAD, d, device="cuda", generator=g) * d**-0.5 * 3).bfloat16()
        weight[VOCAB:] = 0
        teacher_hidden = (hidden.detach().float() + 0.3 * torch.randn(m, d, device="cuda", generator=g)).bfloat16()
        teacher_weight = (weight.float() + 0.01 * torch.randn(VOCAB_PAD, d, device="cuda", generator=g)).bfloat16()
        weight.requires_grad_(True)
        return [hidden, weight], dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)

    return make


def eager(hidden, weight, *, teacher_hidden, teacher_weight, kind):
    return distill_loss_reference(hidden, weight, None, teacher_hidden, teacher_weight, None, 1.0, VOCAB, kind=kind,
                                  normalizer=float(hidden.shape[0]))  # fmt: skip


def fused(hidden, weight, *, teacher_hidden, teacher_weight, kind, impl="triton", chunk_rows=None):
    return distill_loss(hidden, weight, None, teacher_hidden, teacher_weight, None, 1.0, VOCAB, kind=kind,
                        normalizer=float(hidden.shape[0]), impl=impl, chunk_rows=chunk_rows)  # fmt: skip


def liger_method(kind: str):
    if kind not in ("kl_rev", "jsd"):
        return "n/a for this kind"
    module, why = optional_import("liger_kernel.transformers")
    if module is None:
        return why
    loss_fn = module.LigerFusedLinearJSD(jsd_beta=1.0 if kind == "kl_rev" else 0.5)

    def run(hidden, weight, *, teacher_hidden, teacher_weight):
        return loss_fn(hidden, weight[:VOCAB], teacher_hidden, teacher_weight[:VOCAB], None)

    return run


TARGETS = [("full_ms", "", 14.0), ("speedup", "eager", 4.0), ("speedup", "compile", 1.0), ("mem_gb", "", 1.0)]


def cases(shapes, compile_all: bool, kind: str = "kl_rev", chunk_rows: list[int] = ()) -> list[Case]:
    out = []
    ref = functools.partial(eager, kind=kind)
    for n, d in shapes:
        methods = {
            "triton": functools.partial(fused, kind=kind),
            "chunked": functools.partial(fused, kind=kind, impl="chunked"),
            **{f"chunked-{c}": functools.partial(fused, kind=kind, impl="chunked", chunk_rows=c) for c in chunk_rows},
            "eager": ref,
            "compile": maybe_compile(ref, compile_all or (n, d) == (16384, 768)),
            "liger": liger_method(kind),
        }
        out.append(Case(f"distill_{kind}", n, d, make_inputs_factory(n, d), methods, ref))  # oracle: ref in float64
    return out


def main() -> None:
    args = parse_args(__doc__)
    if args.table_only:
        write_markdown()
        return
    rows = run_cases(cases(shapes_from(args), args.compile_all, args.kind, chunk_sizes(args)), args)
    print("\n".join(ratio_report(rows, f"distill_{args.kind}", 16384, 768, TARGETS)))


if __name__ == "__main__":
    main()
