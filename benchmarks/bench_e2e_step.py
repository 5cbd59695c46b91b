"""End-to-end training-step benchmark of a DiT with the torch loss vs the fused kernel (tokens/s, peak memory).

    python benchmarks/bench_e2e_step.py                       # DiT "small", batch 16 x 1024, MDLM and SDTT-like KL
    python benchmarks/bench_e2e_step.py --size tiny --batch 8 --steps 5 --loss mdlm
    python benchmarks/bench_e2e_step.py --device cpu --size test --vocab-size 1001 --batch 2 --length 32 \
        --steps 1 --warmup 0 --no-save                       # CPU smoke run (Triton interpreter)

One step = forward, loss, backward, AdamW step, bf16 autocast (the DiT's own), on one GPU.
* ``mdlm``: x_t masks each token with probability 1 − α_t (log-linear schedule); torch path = ``DiT.forward`` logits +
  ``ddistill.diffusion.absorbing.mdlm_loss_per_token``; kernel path = ``DiT.hidden_states`` + ``masked_diffusion_loss``.
* ``sdtt``: reverse KL(student(x_t) ‖ teacher(x_s)) at the masked positions of x_t, with a frozen teacher copy run on a
  less-noised x_s under ``no_grad``; torch path = both logits + log-softmax KL; kernel path = ``distill_loss``.
Results are printed and appended to benchmarks/results/e2e.csv (GPU, torch, triton, git revision).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import time

import torch

from harness import RESULTS, append_csv, environment

from ddistill.diffusion.absorbing import mdlm_loss_per_token
from ddistill.kernels import distill_loss, masked_diffusion_loss
from ddistill.models.dit import DiT, ModelConfig

EPS = 1e-3
DEVICE = "cuda"


def make_batch(model: DiT, batch: int, length: int, generator: torch.Generator):
    vocab, mask_id = model.vocab_size, model.vocab_size - 1
    x0 = torch.randint(0, mask_id, (batch, length), device=DEVICE, generator=generator)
    t = torch.rand(batch, device=DEVICE, generator=generator) * (1 - EPS) + EPS
    alpha = 1 - (1 - EPS) * t
    masked = torch.rand(batch, length, device=DEVICE, generator=generator) < (1 - alpha)[:, None]
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    # SDTT-like teacher input: a less-noised x_s (each masked token revealed with probability 1/2)
    reveal = masked & (torch.rand(batch, length, device=DEVICE, generator=generator) < 0.5)
    xs = torch.where(reveal, x0, xt)
    return dict(x0=x0, xt=xt, xs=xs, alpha=alpha, dalpha=torch.full_like(alpha, -(1 - EPS)), mask_id=mask_id, vocab=vocab)


def loss_torch(model, teacher, b, kind):
    sigma = -torch.log(b["alpha"])
    logits = model(b["xt"], sigma)
    if kind == "mdlm":
        per_tok = mdlm_loss_per_token(logits, b["x0"], b["xt"], b["alpha"], b["dalpha"], b["mask_id"])
        return per_tok.sum() / per_tok.numel()
    with torch.no_grad():
        t_logits = teacher(b["xs"], sigma).float()
    keep = torch.arange(b["vocab"], device=DEVICE) != b["mask_id"]
    log_q = torch.log_softmax(logits.float()[..., keep], -1)
    log_p = torch.log_softmax(t_logits[..., keep], -1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    masked = b["xt"] == b["mask_id"]
    return torch.where(masked, kl, torch.zeros_like(kl)).sum() / kl.numel()


def loss_kernel(model, teacher, b, kind, impl="triton"):
    sigma = -torch.log(b["alpha"])
    h = model.hidden_states(b["xt"], sigma)
    d = h.shape[-1]
    dtype = model.head_dtype(h.device)  # what the DiT's output linear computes in (bf16 autocast on GPU)
    h = h.reshape(-1, d).to(dtype)
    weight, bias = model.output_weight, model.output_bias
    masked = (b["xt"] == b["mask_id"]).reshape(-1)
    n = masked.numel()
    if kind == "mdlm":
        w = (-b["dalpha"] / (1 - b["alpha"])).repeat_interleave(b["xt"].shape[1])
        return masked_diffusion_loss(h, weight, bias, b["x0"].reshape(-1), w, b["vocab"], b["mask_id"],
                                     is_masked=masked, normalizer=float(n), impl=impl)  # fmt: skip
    with torch.no_grad():
        ht = teacher.hidden_states(b["xs"], sigma).reshape(-1, d).to(dtype)
    return distill_loss(h, weight, bias, ht, teacher.output_weight, teacher.output_bias, 1.0, b["vocab"], kind="kl_rev",
                        mask_id=b["mask_id"], row_mask=masked, normalizer=float(n), impl=impl)  # fmt: skip


def bench(impl: str, kind: str, args) -> dict:
    torch.manual_seed(0)
    model = DiT(ModelConfig(size=args.size, vocab_size=args.vocab_size)).to(DEVICE)
    with torch.no_grad():  # the DiT head is zero-initialised; give it a non-trivial distribution
        model.output_weight.normal_(0, 0.02)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if kind == "sdtt" else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE == "cuda")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    fn = loss_torch if impl == "torch" else functools.partial(loss_kernel, impl=impl)
    length = args.length or model.config.length

    def step():
        b = make_batch(model, args.batch, length, g)
        loss = fn(model, teacher, b, kind)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    row = dict(loss=kind, impl=impl, size=args.size, batch=args.batch, length=length)
    if args.profile:
        return profile_steps(step, args, f"{kind} / {impl}")
    try:
        cuda = DEVICE == "cuda"
        for _ in range(args.warmup):
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        row |= dict(tokens_per_s=args.batch * length * args.steps / elapsed, step_ms=1e3 * elapsed / args.steps,
                    peak_mem_gb=peak, final_loss=loss.item(), status="ok")  # fmt: skip
    except torch.OutOfMemoryError:
        row |= dict(status="OOM")
    del model, teacher, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_steps(step, args, title: str) -> dict:
    """Print torch.profiler's table (CPU ops and GPU kernels by total time) for ``args.steps`` steps after warm-up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(max(args.warmup, 1)):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    print(f"== {title}: {args.steps} steps ==\n" + prof.key_averages().table(sort_by=sort, row_limit=25,
                                                                           max_name_column_width=60), flush=True)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loss", choices=["mdlm", "sdtt", "both"], default="both")
    parser.add_argument("--vocab-size", type=int, default=50258)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (Triton interpreter; use --size test)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per path; no results saved")
    parser.add_argument("--impl", choices=["torch", "triton", "chunked", "both"], default="both",
                        help="both = torch and triton; chunked = the row-chunked cuBLAS losses")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows = []
    for kind in (["mdlm", "sdtt"] if args.loss == "both" else [args.loss]):
        for impl in (["torch", "triton"] if args.impl == "both" else [args.impl]):
            result = bench(impl, kind, args)
            if args.profile:
                continue
            row = {"timestamp": stamp, **env, **result}
            rows.append(row)
            print({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    if not args.no_save and not args.profile:
        fields = ["timestamp", "gpu", "torch", "triton", "git_rev", "loss", "impl", "size", "batch", "length",
                  "tokens_per_s", "step_ms", "peak_mem_gb", "final_loss", "status"]  # fmt: skip
        append_csv(rows, RESULTS / "e2e.csv", fields)


if __name__ == "__main__":
    main()
