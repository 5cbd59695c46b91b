"""Benchmark the fused uniform-state (DUO/UDLM) ELBO against torch eager and torch.compile of the closed form.

    python benchmarks/bench_uniform_elbo.py            # default sweep
    python benchmarks/bench_uniform_elbo.py --quick    # N=16384, d=768 only

Setting: every row contributes; x_t = x_0 on about half the rows; α ∈ (0.05, 0.95) per row (log-linear α' = −0.999);
bias present. "eager" is ``ddistill.diffusion.uniform.duo_elbo_per_token`` on materialised bf16 logits (fp32 math).
Liger / CCE have no equivalent loss.
"""

from __future__ import annotations

import functools

import torch

from harness import VOCAB, VOCAB_PAD, Case, chunk_sizes, maybe_compile, parse_args, ratio_report, run_cases, shapes_from, write_markdown

from ddistill.kernels import uniform_elbo_loss
from ddistill.kernels.reference import uniform_elbo_loss_oracle, uniform_elbo_loss_reference


def make_inputs_factory(n: int, d: int):
    def make(rows: int | None):
        g = torch.Generator(device="cuda").manual_seed(0)
        m = n if rows is None else min(rows, n)
        hidden = torch.randn(m, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
        weight = (torch.randn(VOCAB_PAD, d, device="cuda", generator=g) * d**-0.5).bfloat16()
        weight[VOCAB:] = 0
        weight.requires_grad_(True)
        bias = (torch.randn(VOCAB_PAD, device="cuda", generator=g) * 0.1).bfloat16().requires_grad_(True)
        x0 = torch.randint(0, VOCAB, (m,), device="cuda", generator=g)
        noise = torch.randint(0, VOCAB, (m,), device="cuda", generator=g)
        xt = torch.where(torch.rand(m, device="cuda", generator=g) < 0.5, x0, noise)
        alpha = torch.rand(m, device="cuda", generator=g) * 0.9 + 0.05
        consts = dict(xt=xt, x0=x0, alpha=alpha, dalpha=torch.full_like(alpha, -0.999), normalizer=float(m))
        return [hidden, weight, bias], consts

    return make


def eager(hidden, weight, bias, *, xt, x0, alpha, dalpha, normalizer):
    return uniform_elbo_loss_reference(hidden, weight, bias, xt, x0, alpha, dalpha, VOCAB, normalizer=normalizer)


def oracle(hidden, weight, bias, *, xt, x0, alpha, dalpha, normalizer):
    return uniform_elbo_loss_oracle(hidden, weight, bias, xt, x0, alpha, dalpha, VOCAB, normalizer=normalizer)


def fused(hidden, weight, bias, *, xt, x0, alpha, dalpha, normalizer, impl="triton", chunk_rows=None):
    return uniform_elbo_loss(hidden, weight, bias, xt, x0, alpha, dalpha, VOCAB, normalizer=normalizer, impl=impl,
                             chunk_rows=chunk_rows)  # fmt: skip


TARGETS = [("full_ms", "", 15.0), ("speedup", "eager", 4.0)]


def cases(shapes, compile_all: bool, chunk_rows: list[int] = ()) -> list[Case]:
    out = []
    for n, d in shapes:
        methods = {
            "triton": fused,
            "chunked": functools.partial(fused, impl="chunked"),
            **{f"chunked-{c}": functools.partial(fused, impl="chunked", chunk_rows=c) for c in chunk_rows},
            "eager": eager,
            "compile": maybe_compile(eager, compile_all or (n, d) == (16384, 768)),
        }
        out.append(Case("uniform_elbo", n, d, make_inputs_factory(n, d), methods, oracle))
    return out


def main() -> None:
    args = parse_args(__doc__)
    if args.table_only:
        write_markdown()
        return
    rows = run_cases(cases(shapes_from(args), args.compile_all, chunk_sizes(args)), args)
    print("\n".join(ratio_report(rows, "uniform_elbo", 16384, 768, TARGETS)))


if __name__ == "__main__":
    main()
