"""Benchmark the fused MDLM (SUBS) loss against torch eager, torch.compile, Liger FLCE and Cut Cross-Entropy.

Run on one GPU (default sweep < 4 min on an H100; results appended to benchmarks/results/kernels.csv):

    python benchmarks/bench_mdlm_loss.py            # N in {4096,16384,65536} at d=768, plus N=16384 at d=1024,1536
    python benchmarks/bench_mdlm_loss.py --quick    # N=16384, d=768 only (the target shape)
    python benchmarks/bench_mdlm_loss.py --shapes 8192x768,16384x2048 --methods triton,eager

Setting: half the rows masked (the linear schedule's average), mask id = 50257 (last real id), per-row weights
1/t, bias present, normaliser = N. "eager" materialises bf16 logits for every row and applies the SUBS log-softmax
in fp32 (what the MDLM/DUO reference code does); Liger and CCE get the compacted masked rows and the unpadded
weight W[:50257] (mask column dropped), reduction="none", then the same weighting.
"""

from __future__ import annotations

import functools
import inspect

import torch

from harness import VOCAB, VOCAB_PAD, Case, chunk_sizes, maybe_compile, optional_import, parse_args, ratio_report, run_cases, shapes_from, write_markdown

from ddistill.kernels import masked_diffusion_loss
from ddistill.kernels.reference import masked_diffusion_loss_oracle, masked_diffusion_loss_reference

MASK_ID = VOCAB - 1


def make_inputs_factory(n: int, d: int):
    def make(rows: int | None):
        g = torch.Generator(device="cuda").manual_seed(0)
        m = n if rows is None else min(rows, n)
        hidden = torch.randn(m, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
        weight = (torch.randn(VOCAB_PAD, d, device="cuda", generator=g) * d**-0.5).bfloat16()
        weight[VOCAB:] = 0
        weight.requires_grad_(True)
        bias = (torch.randn(VOCAB_PAD, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_(True)
        targets = torch.randint(0, MASK_ID, (m,), device="cuda", generator=g)
        is_masked = torch.rand(m, device="cuda", generator=g) < 0.5
        t = torch.rand(m, device="cuda", generator=g) * (1 - 1e-3) + 1e-3
        consts = dict(targets=targets, row_weight=1.0 / t, is_masked=is_masked, normalizer=float(m))
        return [hidden, weight, bias], consts

    return make


def eager(hidden, weight, bias, *, targets, row_weight, is_masked, normalizer):
    return masked_diffusion_loss_reference(hidden, weight, bias, targets, row_weight, VOCAB, MASK_ID, is_masked=is_masked, normalizer=normalizer)


def oracle(hidden, weight, bias, *, targets, row_weight, is_masked, normalizer):
    return masked_diffusion_loss_oracle(hidden, weight, bias, targets, row_weight, VOCAB, MASK_ID, is_masked=is_masked, normalizer=normalizer)


def fused(hidden, weight, bias, *, targets, row_weight, is_masked, normalizer, impl="triton", chunk_rows=None):
    return masked_diffusion_loss(hidden, weight, bias, targets, row_weight, VOCAB, MASK_ID, is_masked=is_masked,
                                 normalizer=normalizer, impl=impl, chunk_rows=chunk_rows)  # fmt: skip


def liger_method():
    module, why = optional_import("liger_kernel.transformers")
    if module is None:
        return why
    loss_fn = module.LigerFusedLinearCrossEntropyLoss(reduction="none")

    def run(hidden, weight, bias, *, targets, row_weight, is_masked, normalizer):
        idx = is_masked.nonzero().squeeze(1)
        per_row = loss_fn(weight[:MASK_ID], hidden[idx], targets[idx], bias[:MASK_ID])
        return (per_row.float() * row_weight[idx]).sum() / normalizer

    return run


def cce_method():
    module, why = optional_import("cut_cross_entropy")
    if module is None:
        return why
    params = inspect.signature(module.linear_cross_entropy).parameters
    # exact mode: no gradient filtering, fp32 accumulation ("cce_exact" where it exists, else filter_eps=None)
    options = dict(impl="cce_exact") if "bias" in params else dict(filter_eps=None)

    def run(hidden, weight, bias, *, targets, row_weight, is_masked, normalizer):
        idx = is_masked.nonzero().squeeze(1)
        extra = dict(bias=bias[:MASK_ID]) if "bias" in params else {}
        per_row = module.linear_cross_entropy(hidden[idx], weight[:MASK_ID], targets[idx], reduction="none", **options, **extra)
        return (per_row.float() * row_weight[idx]).sum() / normalizer

    if "bias" not in params:
        run.note = " (this CCE version has no bias: run without it)"
    return run


TARGETS = [("full_ms", "", 4.5), ("speedup", "eager", 6.0), ("speedup", "liger", 2.0), ("speedup", "cce", 1.0), ("mem_gb", "", 0.3)]


def cases(shapes, compile_all: bool, chunk_rows: list[int] = ()) -> list[Case]:
    out = []
    for n, d in shapes:
        methods = {
            "triton": fused,
            "chunked": functools.partial(fused, impl="chunked"),
            **{f"chunked-{c}": functools.partial(fused, impl="chunked", chunk_rows=c) for c in chunk_rows},
            "eager": eager,
            "compile": maybe_compile(eager, compile_all or (n, d) == (16384, 768)),
            "liger": liger_method(),
            "cce": cce_method(),
        }
        out.append(Case("mdlm", n, d, make_inputs_factory(n, d), methods, oracle))
    return out


def main() -> None:
    args = parse_args(__doc__)
    if args.table_only:
        write_markdown()
        return
    rows = run_cases(cases(shapes_from(args), args.compile_all, chunk_sizes(args)), args)
    print("\n".join(ratio_report(rows, "mdlm", 16384, 768, TARGETS)))


if __name__ == "__main__":
    main()
