"""Sample-quality evaluation of a diffusion LM across numbers of sampling steps (DUO arXiv 2506.10892 §5/Table 3,
SDTT arXiv 2410.21035 §4).

For each T in ``steps_list``: draw ``num_samples`` unconditional samples of ``length`` tokens with
``sample_mdlm`` (absorbing), ``sample_duo`` (uniform) or ``sample_dimo`` (dimo: a DiMO generator; its
``sampler_kwargs`` carry embed_dim, noise_rms, r_init, embed_noise, temperature), decode them with the model
tokenizer (only [MASK] dropped), and record Gen PPL (judge, retokenised, first-EOS rule, truncated to ``length`` judge
tokens), mean unigram entropy of the generated ids, batch diversity (distinct-2/3/4, duplicate fraction), the mean
NFE per batch, and optionally MAUVE of prompt continuations: each reference document
with at least ``mauve_length`` model tokens gives a prompt of its first ``mauve_prompt_tokens`` tokens; the model
fills a ``mauve_length``-token canvas whose prefix is clamped to the prompt, and MAUVE compares those canvases
(prompt included) with the references truncated to ``mauve_length`` tokens.

Data parallel: every rank draws ``num_samples / world_size`` samples (batch ``i`` of rank ``r`` is seeded from
``(seed, T, global index of its first sample)``), ``all_gather_fn`` concatenates the per-rank tensors along dim 0 in
rank order, and rank 0 scores, writes the report (CSV / Markdown / PNG, merged with earlier labels in ``out_dir``)
and returns the rows; other ranks return ``[]``. Rank 0 shows a progress bar on stderr over every sampled batch
(step counts × batches, MAUVE continuations included).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ddistill.diffusion.samplers import SampleResult, sample_dimo, sample_duo, sample_mdlm
from ddistill.diffusion.schedules import NoiseSchedule
from ddistill.eval.decode import decode_samples
from ddistill.eval.judge import CausalJudge
from ddistill.eval.metrics import (
    PROCESSES,
    distinct_n,
    duplicate_fraction,
    eval_mode,
    gen_ppl_interval,
    mauve_score,
    mean_interval,
    unigram_entropy_per_sample,
)

SAMPLERS = (*PROCESSES, "dimo")  # the processes plus the DiMO generator's sampler
from ddistill.eval.report import EvalRow, write_report
from ddistill.models.dit import DiT

AllGather = Callable[[torch.Tensor], torch.Tensor]


def describe_device(device: torch.device, world_size: int = 1) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name if world_size == 1 else f"{world_size}x {name}"


def _batch_seed(seed: int, steps: int, first_index: int) -> int:
    return (seed * 1_000_003 + steps * 10_007 + first_index) % (2**63 - 1)


def _draw(
    denoiser,
    *,
    process: str,
    steps: int,
    batch_size: int,
    length: int,
    generator: torch.Generator,
    device: torch.device,
    vocab_size: int,
    mask_id: int | None,
    schedule: NoiseSchedule,
    prefix: torch.Tensor | None,
    sampler_kwargs: dict,
) -> SampleResult:
    common = dict(
        batch_size=batch_size,
        length=length,
        num_steps=steps,
        vocab_size=vocab_size,
        schedule=schedule,
        generator=generator,
        device=device,
        prefix=prefix,
        **sampler_kwargs,
    )
    if process == "absorbing":
        return sample_mdlm(denoiser, mask_id=mask_id, **common)
    if process == "dimo":
        common.pop("schedule")
        return sample_dimo(denoiser, mask_id=mask_id, **common)
    return sample_duo(denoiser, **common)


def _sample_shard(
    denoiser,
    *,
    num_local: int,
    first_global: int,
    batch_size: int,
    seed: int,
    steps: int,
    device: torch.device,
    prefixes: torch.Tensor | None,
    on_batch: Callable[[], None] = lambda: None,
    **draw_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_local, L) tokens and the NFE of each batch (float64) for this rank's slice of the global samples;
    `on_batch()` after each batch."""
    tokens, nfes = [], []
    for start in range(0, num_local, batch_size):
        size = min(batch_size, num_local - start)
        generator = torch.Generator(device=device).manual_seed(_batch_seed(seed, steps, first_global + start))
        prefix = None if prefixes is None else prefixes[start : start + size]
        result = _draw(
            denoiser, steps=steps, batch_size=size, generator=generator, device=device, prefix=prefix, **draw_kwargs
        )
        tokens.append(result.tokens.to(torch.long))
        nfes.append(float(result.nfe))
        on_batch()
    return torch.cat(tokens), torch.tensor(nfes, dtype=torch.float64, device=device)


def mauve_prompts(
    reference_texts: Sequence[str], tokenizer, *, num_prompts: int, prompt_tokens: int, canvas_tokens: int
) -> tuple[torch.Tensor, list[str]]:
    """Prompts (P, prompt_tokens) and human references (decoded first ``canvas_tokens`` tokens) from documents."""
    if not 0 < prompt_tokens < canvas_tokens:
        raise ValueError(f"need 0 < mauve_prompt_tokens={prompt_tokens} < mauve_length={canvas_tokens}")
    docs = []
    for text in reference_texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= canvas_tokens:
            docs.append(ids[:canvas_tokens])
        if len(docs) == num_prompts:
            break
    if not docs:
        raise ValueError(f"no reference document has >= {canvas_tokens} tokens for MAUVE prompts")
    ids = torch.tensor(docs, dtype=torch.long)
    return ids[:, :prompt_tokens], decode_samples(ids, tokenizer, mask_id=None)


def write_samples_jsonl(path: Path, texts: Sequence[str]) -> None:
    """One ``{"text": ...}`` line per decoded sample (the files `write_samples_markdown` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def write_samples_markdown(out_dir: str | Path, *, per_cell: int = 3, max_chars: int = 600) -> Path:
    """``out_dir/samples.md``: the first `per_cell` decoded samples of every ``samples/<label>_T<steps>.jsonl``
    (the files `evaluate_sampler` writes), grouped by step count so that models can be read side by side."""
    out_dir = Path(out_dir)
    cells: dict[int, list[tuple[str, list[str]]]] = {}
    for path in sorted((out_dir / "samples").glob("*_T*.jsonl")):
        match = re.fullmatch(r"(.+)_T(\d+)", path.stem)
        if match is None:
            continue  # e.g. the MAUVE continuations (<label>_T<steps>_mauve.jsonl)
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()[:per_cell]]
        cells.setdefault(int(match.group(2)), []).append((match.group(1), texts))
    lines = ["# Samples", "", f"The first {per_cell} samples of each model at each number of sampling steps.", ""]
    for steps in sorted(cells):
        lines += [f"## {steps} steps", ""]
        for label, texts in cells[steps]:
            lines += [f"### {label}", ""]
            for i, text in enumerate(texts):
                shown = text if len(text) <= max_chars else text[:max_chars] + " …"
                lines += [f"{i + 1}. " + " ".join(shown.split()), ""]
    path = out_dir / "samples.md"
    path.write_text("\n".join(lines))
    return path


def sampling_progress(total_batches: int, *, desc: str = "sampling", enabled: bool = True):
    """A tqdm bar on stderr over `total_batches` sampled batches (None when disabled)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_batches, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


@torch.no_grad()
def evaluate_sampler(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    process: str,
    steps_list: Sequence[int],
    num_samples: int,
    batch_size: int,
    judge: CausalJudge | None,
    tokenizer,
    seed: int,
    out_dir: str | Path,
    label: str,
    length: int,
    vocab_size: int,
    schedule: NoiseSchedule,
    mask_id: int | None = None,
    device: torch.device | str | None = None,
    sampler_kwargs: dict | None = None,
    judge_batch_size: int = 8,
    reference_texts: Sequence[str] | None = None,
    mauve_num_prompts: int = 256,
    mauve_prompt_tokens: int = 50,
    mauve_length: int = 100,
    mauve_kwargs: dict | None = None,
    save_texts: bool = True,
    rank: int = 0,
    world_size: int = 1,
    all_gather_fn: AllGather | None = None,
    stem: str = "sample_eval",
    progress: bool = True,
) -> list[EvalRow]:
    """Sample at every T in ``steps_list`` and score (module docstring). ``denoiser(x, sigma) -> logits`` may be a
    DiT (put in eval mode for the call, its mode restored after; for MDLM its ``config.time_conditioning`` sets the
    sampler's ``time_conditioning`` and ``cached`` unless given). ``sampler_kwargs`` go to the sampler
    (``nucleus_p``, ``greedy_tail``, ``cached``, ``time_conditioning``, ``t_end``, ``dtype``).
    ``judge`` is only needed on rank 0. ``progress``: the progress bar of rank 0 (module docstring).
    """
    if process not in SAMPLERS:
        raise ValueError(f"process must be one of {SAMPLERS}, got {process!r}")
    if process in ("absorbing", "dimo") and mask_id is None:
        raise ValueError(f"evaluate_sampler(process={process!r}) needs mask_id")
    if not steps_list or any(int(s) < 1 for s in steps_list):
        raise ValueError(f"steps_list must be non-empty positive ints, got {list(steps_list)}")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples={num_samples} and batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if num_samples % world_size:
        raise ValueError(f"num_samples={num_samples} must be divisible by world_size={world_size}")
    if world_size > 1 and all_gather_fn is None:
        raise ValueError("world_size > 1 needs all_gather_fn to collect the samples on rank 0")
    if rank == 0 and judge is None:
        raise ValueError("rank 0 needs a judge")
    if isinstance(denoiser, torch.nn.Module):
        device = next(denoiser.parameters()).device if device is None else torch.device(device)
    device = torch.device("cpu") if device is None else torch.device(device)
    gather = all_gather_fn if world_size > 1 else (lambda t: t)
    num_local = num_samples // world_size
    sampler_kwargs = dict(sampler_kwargs or {})
    time_conditioning = getattr(getattr(denoiser, "config", None), "time_conditioning", None)
    if process == "absorbing" and time_conditioning is not None:
        # the MDLM cache is only exact for a denoiser that ignores sigma
        sampler_kwargs.setdefault("time_conditioning", bool(time_conditioning))
        sampler_kwargs.setdefault("cached", not time_conditioning)
    if process == "absorbing" and isinstance(denoiser, DiT):
        sampler_kwargs.setdefault("row_logits", True)  # x_θ at the revealed positions only (DiT.forward's rows)
    draw_kwargs = dict(
        process=process,
        length=length,
        vocab_size=vocab_size,
        mask_id=mask_id,
        schedule=schedule,
        sampler_kwargs=sampler_kwargs,
    )

    prompts = human = None
    if reference_texts is not None:
        prompts, human = mauve_prompts(
            reference_texts,
            tokenizer,
            num_prompts=mauve_num_prompts,
            prompt_tokens=mauve_prompt_tokens,
            canvas_tokens=mauve_length,
        )
        usable = prompts.shape[0] - prompts.shape[0] % world_size
        if usable == 0:
            raise ValueError(f"{prompts.shape[0]} MAUVE prompts cannot be split over world_size={world_size}")
        prompts, human = prompts[:usable], human[:usable]

    per_steps = math.ceil(num_local / batch_size)
    if prompts is not None:
        per_steps += math.ceil(prompts.shape[0] // world_size / batch_size)
    bar = sampling_progress(len(steps_list) * per_steps, desc=f"sampling {label}", enabled=progress and rank == 0)
    tick = (lambda: None) if bar is None else (lambda: bar.update(1))
    rows = []
    with eval_mode(denoiser):
        for steps in [int(s) for s in steps_list]:
            if bar is not None:
                bar.set_postfix(steps=steps, refresh=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start_time = time.perf_counter()
            local_tokens, local_nfe = _sample_shard(
                denoiser,
                num_local=num_local,
                first_global=rank * num_local,
                batch_size=batch_size,
                seed=seed,
                steps=steps,
                device=device,
                prefixes=None,
                on_batch=tick,
                **draw_kwargs,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start_time
            tokens, nfe = gather(local_tokens), gather(local_nfe)

            continuations = None
            if prompts is not None:
                per_rank = prompts.shape[0] // world_size
                local_cont, _ = _sample_shard(
                    denoiser,
                    num_local=per_rank,
                    first_global=num_samples + rank * per_rank,  # disjoint from the unconditional seeds
                    batch_size=batch_size,
                    seed=seed,
                    steps=steps,
                    device=device,
                    prefixes=prompts[rank * per_rank : (rank + 1) * per_rank].to(device),
                    on_batch=tick,
                    **{**draw_kwargs, "length": mauve_length},
                )
                continuations = gather(local_cont)
            if rank != 0:
                continue

            texts = decode_samples(tokens, tokenizer, mask_id)
            mauve = None
            if continuations is not None:
                continuation_texts = decode_samples(continuations, tokenizer, mask_id)
                mauve = mauve_score(
                    human, continuation_texts, judge, batch_size=judge_batch_size, **(mauve_kwargs or {})
                )
                if save_texts:
                    write_samples_jsonl(Path(out_dir) / "samples" / f"{_safe(label)}_T{steps}_mauve.jsonl",
                                        continuation_texts)
            nll_sums, token_counts = judge.score_texts_per_sample(texts, batch_size=judge_batch_size,
                                                                   max_length=length)
            if int(token_counts.sum()) == 0:
                raise ValueError(f"{label} at T={steps}: the judge found no valid tokens in the samples")
            entropies = unigram_entropy_per_sample(tokens)
            ppl_lo, ppl_hi = gen_ppl_interval(nll_sums, token_counts, seed=seed)
            entropy_lo, entropy_hi = mean_interval(entropies, seed=seed)
            row = EvalRow(
                label=label,
                steps=steps,
                nfe=float(nfe.mean()),
                gen_ppl=math.exp(float(nll_sums.sum()) / int(token_counts.sum())),
                entropy=float(entropies.mean()),
                gen_ppl_lo=ppl_lo,
                gen_ppl_hi=ppl_hi,
                entropy_lo=entropy_lo,
                entropy_hi=entropy_hi,
                mauve=mauve,
                distinct_2=distinct_n(tokens, 2),
                distinct_3=distinct_n(tokens, 3),
                distinct_4=distinct_n(tokens, 4),
                duplicate_frac=duplicate_fraction(tokens),
                num_samples=tokens.shape[0],
                judge=judge.name,
                device=describe_device(device, world_size),
                sample_seconds=seconds,
            )
            rows.append(row)
            if save_texts:
                write_samples_jsonl(Path(out_dir) / "samples" / f"{_safe(label)}_T{steps}.jsonl", texts)
    if bar is not None:
        bar.close()
    if rank == 0:
        write_report(rows, out_dir, stem=stem)
        if save_texts:
            write_samples_markdown(out_dir)
    return rows
