"""The MDLM / DUO diffusion transformer (DiT) backbone and its causal (AR) twin.

Architecture of MDLM (Sahoo et al., arXiv 2406.07524) as reused by SDTT (arXiv 2410.21035) and DUO (arXiv 2506.10892):

    h_0   = E[x]                       (ids)   or   softmax(x, -1) @ E   in fp32   (soft input, DUO curriculum)
            or Σ_j w_j E[i_j]          (soft_inputs = (indices, weights) pairs, fp32 embedding_bag: the low-memory
                                        DUO curriculum feeds the few coordinates that carry its tempered softmax)
    h_0  ← s·n + √(1 − s²)·h_0         only with `embed_noise=EmbedNoise(s, n)` (DiMO's generator input, arXiv
                                       2503.15457: Gaussian noise n mixed into the input embeddings)
    c     = SiLU(MLP(φ(σ)))            φ(σ) = [cos(σ f_i), sin(σ f_i)]_{i<128}, f_i = 10000^{-i/128};
                                       σ = -log α_t (zeroed when time conditioning is off, as in MDLM)
    block: (s1, a1, g1, s2, a2, g2) = W_ada c
           h = h + g1 · Drop(W_o Attn(RoPE(W_qkv (LN(h)(1 + a1) + s1))))
           h = h + g2 · Drop(MLP(LN(h)(1 + a2) + s2))          MLP = Linear(d, 4d) → GELU(tanh) → Linear(4d, d)
    out:   (s, a) = W_fin c ;  z = LN(h)(1 + a) + s ;  logits = W_out z + b_out

LN is a weight-only LayerNorm computed in fp32; RoPE uses base 10000 and the rotate-half convention over the full head
dim; attention is bidirectional (causal for the AR variant, which drops σ and every adaLN modulation). adaLN and the
output linear are zero-initialised, so a fresh model outputs logits 0. The output layer stores its vocabulary padded to
a multiple of `pad_vocab_multiple` (zero rows, never read by `forward`); state-dict hooks expose the public (V, d)
shape. No-grad CUDA forwards of uncompiled adaLN blocks (samplers, frozen teachers) do the blocks' elementwise work
in the Triton kernels of `ddistill.kernels.dit_block` (`block_kernels="auto"`, the default; same math and rounding
points, `"torch"` for the plain ops).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional dependency; the sdpa path computes the same function
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = None

ATTN_BACKENDS = ("auto", "sdpa", "flash")
BLOCK_KERNELS = ("auto", "torch")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}
TIME_FEATURES = 256  # sinusoidal features of σ (cos half first, then sin half)
ROPE_BASE = 10_000.0
MLP_RATIO = 4
SoftInputs = tuple[torch.Tensor, torch.Tensor]  # (indices, weights), both (B, L, J)


@dataclass(kw_only=True)
class ModelConfig:
    """DiT hyper-parameters. Fields left as None are filled from `MODEL_SIZES[size]` by `resolve_model_config`."""

    size: str = "test"
    hidden_size: int | None = None
    n_blocks: int | None = None
    n_heads: int | None = None
    cond_dim: int | None = None
    length: int | None = None  # training context length (informational; RoPE works for any length)
    dropout: float = 0.1
    vocab_size: int = 50258
    time_conditioning: bool = True
    causal: bool = False
    pad_vocab_multiple: int = 64
    attn_backend: str = "auto"  # "sdpa" | "flash" | "auto" (flash when installed and inputs are fp16/bf16 CUDA)
    autocast_dtype: str = "bfloat16"  # dtype of the blocks/output layer on CUDA, as the reference; "float32" = off
    # "auto": no-grad CUDA forwards of uncompiled blocks do their elementwise work in the Triton kernels of
    # ddistill.kernels.dit_block (inference only; same math, rounded where the eager ops round); "torch": never
    block_kernels: str = "auto"


MODEL_SIZES: dict[str, dict[str, int]] = {
    "test": dict(hidden_size=64, n_blocks=2, n_heads=4, cond_dim=32, length=64),
    "tiny": dict(hidden_size=256, n_blocks=8, n_heads=8, cond_dim=128, length=1024),
    "small": dict(hidden_size=768, n_blocks=12, n_heads=12, cond_dim=128, length=1024),
    "medium": dict(hidden_size=1024, n_blocks=24, n_heads=16, cond_dim=128, length=1024),
    "large": dict(hidden_size=1536, n_blocks=24, n_heads=16, cond_dim=128, length=1024),
}


def resolve_model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Return a validated copy of `cfg` with None fields filled from the named size."""
    if isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; allowed keys are {sorted(known)}")
        cfg = ModelConfig(**cfg)
    if cfg.size not in MODEL_SIZES:
        raise ValueError(f"model.size={cfg.size!r} is not a known size; allowed values: {sorted(MODEL_SIZES)}")
    preset = MODEL_SIZES[cfg.size]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None})
    for key in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length", "vocab_size", "pad_vocab_multiple"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{key}={value!r} must be a positive integer")
    if cfg.hidden_size % cfg.n_heads:
        raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.n_heads={cfg.n_heads}")
    if (cfg.hidden_size // cfg.n_heads) % 2:
        raise ValueError(f"model head dim {cfg.hidden_size // cfg.n_heads} must be even for rotary embeddings")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout={cfg.dropout!r} must lie in [0, 1)")
    if cfg.attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"model.attn_backend={cfg.attn_backend!r}; allowed values: {list(ATTN_BACKENDS)}")
    if cfg.attn_backend == "flash" and flash_attn_func is None:
        raise ValueError("model.attn_backend='flash' but flash_attn is not installed; use 'auto' or 'sdpa'")
    if cfg.block_kernels not in BLOCK_KERNELS:
        raise ValueError(f"model.block_kernels={cfg.block_kernels!r}; allowed values: {list(BLOCK_KERNELS)}")
    if cfg.autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"model.autocast_dtype={cfg.autocast_dtype!r}; allowed values: {list(AUTOCAST_DTYPES)}")
    return cfg


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class LayerNorm(nn.Module):
    """Weight-only LayerNorm (eps 1e-5) evaluated in fp32 regardless of autocast."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.float(), (self.dim,)) * self.weight.float()


class TimestepEmbedder(nn.Module):
    """σ (B,) → MLP([cos(σ f), sin(σ f)]) (B, cond_dim)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FEATURES, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    @staticmethod
    def features(sigma: torch.Tensor) -> torch.Tensor:
        half = TIME_FEATURES // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
        args = sigma.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        feats = self.features(sigma)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    """Rotary position embedding, rotate-half convention, base 10000, over the full head dim."""

    def __init__(self, head_dim: int):
        super().__init__()
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, head_dim) cos and sin tables in fp32."""
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.float().to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D); cos/sin (L, D). Computed in x's dtype, as the reference does under autocast."""
    cos = cos[None, :, None, :].to(x.dtype)
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, backend: str) -> torch.Tensor:
    """q, k, v (B, L, H, D) → (B, L, H·D): softmax(q kᵀ/√D) v, unmasked (bidirectional) or causal."""
    b, l, h, d = q.shape
    use_flash = (
        backend in ("auto", "flash")
        and flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if use_flash:
        return flash_attn_func(q, k, v, dropout_p=0.0, causal=causal).reshape(b, l, h * d)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2).reshape(b, l, h * d)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Transformer block; adaLN-modulated unless `causal` (then plain pre-LN with causal attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.attn_backend = cfg.attn_backend
        self.block_kernels = cfg.block_kernels
        # Registration order matters: it is the reference's parameters() order used by Lightning EMA shadow params.
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, MLP_RATIO * d), nn.GELU(approximate="tanh"), nn.Linear(MLP_RATIO * d, d))
        if not cfg.causal:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def _attn(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, l, d = h.shape
        q, k, v = self.attn_qkv(h).view(b, l, 3, self.n_heads, d // self.n_heads).unbind(2)  # packed (three h d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.attn_out(attention(q, k, v, causal=self.causal, backend=self.attn_backend))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.causal:
            x = x + F.dropout(self._attn(self.norm1(x), cos, sin), self.dropout, self.training)
            return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)
        mod = self.adaLN_modulation(c)
        if self._use_block_kernels(x):
            return self.forward_block_kernels(x, mod, cos, sin)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod[:, None].chunk(6, dim=2)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1 * F.dropout(self._attn(h, cos, sin), self.dropout, self.training)
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2 * F.dropout(self.mlp(h), self.dropout, self.training)

    def _use_block_kernels(self, x: torch.Tensor) -> bool:
        """Inference on CUDA through uncompiled code with every weight present (a ZeRO-3 module-by-module gather
        fetches a submodule's weights only when the submodule is called, and the kernels read the LayerNorms')."""
        d = x.shape[-1]
        return (self.block_kernels == "auto" and x.is_cuda and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and (self.dropout == 0.0 or not self.training)
                and self.norm1.weight.numel() == d and self.norm2.weight.numel() == d)

    def forward_block_kernels(self, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor) -> torch.Tensor:
        """`forward`'s adaLN path (no dropout, no autograd) with its elementwise work in the kernels of
        `ddistill.kernels.dit_block`: three row passes and one RoPE pass instead of ~28 elementwise kernels."""
        from ddistill.kernels.dit_block import gated_residual, modulated_layer_norm, rotary_qk

        b, l, d = x.shape
        device = x.device.type
        act = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        h = modulated_layer_norm(x, self.norm1.weight, mod, 0, out_dtype=act)
        qkv = self.attn_qkv(h).view(b, l, 3, self.n_heads, d // self.n_heads)
        q, k = rotary_qk(qkv, cos, sin)
        y = self.attn_out(attention(q, k, qkv[:, :, 2], causal=False, backend=self.attn_backend))
        x, h = gated_residual(x, y, mod, 2, weight=self.norm2.weight, shift=3, out_dtype=act)
        return gated_residual(x, self.mlp(h), mod, 5)


class PaddedLinear(nn.Module):
    """Linear(d → V) stored as (V_pad, d) / (V_pad,) with zero padding rows; the state dict shows (V, d) / (V,).

    `forward` returns the V_pad logits (callers slice); the slice discards the padded columns, so padded rows receive
    exactly zero gradient and, starting at zero, stay zero under Adam(W).
    """

    def __init__(self, in_features: int, vocab_size: int, padded_size: int):
        super().__init__()
        assert padded_size >= vocab_size
        self.vocab_size = vocab_size
        self.padded_size = padded_size
        self.weight = nn.Parameter(torch.zeros(padded_size, in_features))
        self.bias = nn.Parameter(torch.zeros(padded_size))
        self.register_state_dict_post_hook(PaddedLinear._strip_padding)
        self.register_load_state_dict_pre_hook(PaddedLinear._add_padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @staticmethod
    def _strip_padding(module: PaddedLinear, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        for name in ("weight", "bias"):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = state_dict[key][: module.vocab_size]

    @staticmethod
    def _add_padding(module: PaddedLinear, state_dict: dict, prefix: str, *args: Any) -> None:
        pad = module.padded_size - module.vocab_size
        for name in ("weight", "bias"):
            key = prefix + name
            tensor = state_dict.get(key)
            # Only the public shape is padded; any other shape is left for load_state_dict to reject.
            if pad and tensor is not None and tensor.ndim >= 1 and tensor.shape[0] == module.vocab_size:
                padding = tensor.new_zeros((pad, *tensor.shape[1:]))
                state_dict[key] = torch.cat([tensor, padding], dim=0)


class OutputLayer(nn.Module):
    """Final LN (+ adaLN shift/scale unless causal) and the vocabulary projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.causal = cfg.causal
        self.norm_final = LayerNorm(d)
        self.linear = PaddedLinear(d, cfg.vocab_size, padded_vocab(cfg.vocab_size, cfg.pad_vocab_multiple))
        if not cfg.causal:
            self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * d)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def hidden(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_final(x)
        if self.causal:
            return h
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(h, shift, scale)


class EmbeddingLayer(nn.Module):
    """Raw (V, d) embedding: ids → E[x]; float (B, L, V) → softmax(x, -1) @ E in fp32; `bag` → Σ_j w_j E[i_j]."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            with torch.autocast(device_type=x.device.type, enabled=False):
                return torch.softmax(x.float(), dim=-1) @ self.embedding.float()
        # F.embedding, not self.embedding[x]: on CUDA the indexing's backward (index_put with accumulate) serialises
        # duplicate ids (half an MDLM batch is [MASK]) and took 11 ms of a `small` step on an H200
        return F.embedding(x, self.embedding)

    def bag(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, L, J) ids and weights → (B, L, d) Σ_j w_j E[i_j] in fp32 (one embedding_bag; no (B, L, V) tensor)."""
        if indices.shape != weights.shape or indices.ndim != 3:
            raise ValueError(f"soft_inputs: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} "
                             "must both be (B, L, J)")
        b, l, j = indices.shape
        with torch.autocast(device_type=indices.device.type, enabled=False):
            out = F.embedding_bag(indices.reshape(b * l, j), self.embedding.float(),
                                  per_sample_weights=weights.reshape(b * l, j).float(), mode="sum")
        return out.view(b, l, -1)


class EmbedNoise(NamedTuple):
    """Noise mixed into the input embeddings: h ← scale·noise + √(1 − scale²)·h; noise (B, L, d), 0 ≤ scale ≤ 1."""

    scale: float
    noise: torch.Tensor

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if not 0.0 <= self.scale <= 1.0:
            raise ValueError(f"embed_noise scale={self.scale} must lie in [0, 1]")
        if self.noise.shape != h.shape:
            raise ValueError(f"embed_noise of shape {tuple(self.noise.shape)} does not match the embeddings "
                             f"{tuple(h.shape)}")
        return self.scale * self.noise.to(h.dtype) + math.sqrt(1.0 - self.scale**2) * h


class DiT(nn.Module):
    """MDLM/DUO DiT (or its causal AR variant). `forward(x, sigma) -> logits (B, L, vocab_size)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = resolve_model_config(cfg)
        self.config = cfg
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.hidden_size)
        if not cfg.causal:
            self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.hidden_size // cfg.n_heads)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.n_blocks)])
        self.output_layer = OutputLayer(cfg)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.output_layer.linear.padded_size

    @property
    def output_weight(self) -> nn.Parameter:
        """(V_pad, d); rows >= vocab_size are zero padding."""
        return self.output_layer.linear.weight

    @property
    def output_bias(self) -> nn.Parameter:
        """(V_pad,); entries >= vocab_size are zero padding."""
        return self.output_layer.linear.bias

    def input_embedding_rms(self) -> float:
        """√mean(E²) over the input embedding table: the scale of `embed_noise` that matches the embeddings."""
        return float(self.input_embedding_rms_tensor())

    def input_embedding_rms_tensor(self) -> torch.Tensor:
        """`input_embedding_rms` as a 0-d fp32 tensor on the table's device (no host sync, for the training step)."""
        return self.vocab_embed.embedding.detach().float().pow(2).mean().sqrt()

    def num_parameters(self, public: bool = True) -> int:
        """Parameter count; `public=True` counts the output layer at its unpadded (V, d) / (V,) shape."""
        total = sum(p.numel() for p in self.parameters())
        if public:
            pad = self.padded_vocab_size - self.vocab_size
            total -= pad * (self.config.hidden_size + 1)
        return total

    def head_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the output linear computes in on ``device``: the autocast dtype on CUDA (bf16 by default), else
        fp32. Fused losses take the hidden states in this dtype, so their logits have `forward`'s precision (fp32
        hidden states would send the Triton kernels down their exact-fp32 path, several times slower)."""
        dtype = AUTOCAST_DTYPES[self.config.autocast_dtype]
        return dtype if device.type == "cuda" and dtype is not None else torch.float32

    def compile_blocks(self, **options: Any) -> None:
        """Regional torch.compile: each DiTBlock compiled in place (`nn.Module.compile`; the state dict keeps its
        keys). The blocks share their code and shapes, so one graph serves all of them; the embedding, σ-map, output
        layer and every loss stay eager, so the fused Triton losses stay outside the graphs."""
        for block in self.blocks:
            block.compile(**options)

    def set_block_kernels(self, mode: str) -> None:
        """Switch `ModelConfig.block_kernels` ("auto" | "torch") on a built model (one set of weights, both paths)."""
        self.config = resolve_model_config(dataclasses.replace(self.config, block_kernels=mode))
        for block in self.blocks:
            block.block_kernels = mode

    def _autocast(self, device: torch.device) -> torch.autocast:
        dtype = AUTOCAST_DTYPES[self.config.autocast_dtype]
        enabled = device.type == "cuda" and dtype is not None
        return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=enabled)

    def _conditioning(self, x: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor | None:
        if self.config.causal:
            return None
        batch = x.shape[0]
        if not self.config.time_conditioning:
            sigma = torch.zeros(batch, device=x.device)
        elif sigma is None:
            raise ValueError("sigma is required for a time-conditioned DiT")
        if sigma.shape != (batch,):
            raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.silu(self.sigma_map(sigma))

    def hidden_states(
        self, x: torch.Tensor, sigma: torch.Tensor | None = None, soft_inputs: SoftInputs | None = None, *,
        embed_noise: EmbedNoise | None = None,
    ) -> torch.Tensor:
        """(B, L, d): the input of the output linear (final LN + adaLN modulation), fp32 from the fp32 LN.

        `soft_inputs` = (indices, weights), both (B, L, J): the input embedding of position l is
        Σ_j weights[l, j]·E[indices[l, j]] instead of E[x[l]] (x then only gives the shape). `embed_noise` mixes
        noise into the input embeddings (module docstring)."""
        if x.ndim == 3 and x.shape[-1] != self.vocab_size:
            raise ValueError(f"soft input must have last dim vocab_size={self.vocab_size}, got {x.shape[-1]}")
        if soft_inputs is None:
            h = self.vocab_embed(x)
        else:
            indices, weights = soft_inputs
            if indices.shape[:2] != x.shape[:2]:
                raise ValueError(f"soft_inputs of shape {tuple(indices.shape)} do not match x {tuple(x.shape)}")
            h = self.vocab_embed.bag(indices, weights)
        if embed_noise is not None:
            h = EmbedNoise(*embed_noise).apply(h)
        c = self._conditioning(x, sigma)
        cos, sin = self.rotary_emb.cos_sin(x.shape[1], x.device)
        with self._autocast(x.device):
            for block in self.blocks:
                h = block(h, c, cos, sin)
            return self.output_layer.hidden(h, c)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        soft_inputs: SoftInputs | None = None,
        *,
        embed_noise: EmbedNoise | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, vocab_size); bf16 on CUDA under the default autocast, fp32 on CPU.

        `rows` (a (B, L) bool mask, or a 1-D integer tensor of flat positions b·L + l) applies the output layer to
        the selected positions only and returns (num_selected, vocab_size): the masked-diffusion losses read masked
        positions only, the MDLM sampler the positions it reveals, and the output layer is most of the cost of a
        small model at V = 50258 (positions given as indices need no host sync). `soft_inputs`, `embed_noise`: see
        `hidden_states`.
        """
        h = self.hidden_states(x, sigma, soft_inputs, embed_noise=embed_noise)
        if rows is not None:
            if rows.dtype == torch.bool:
                if rows.shape != x.shape[:2]:
                    raise ValueError(f"rows must have shape {tuple(x.shape[:2])}, got {tuple(rows.shape)}")
                h = h[rows]
            elif rows.dim() == 1 and not rows.is_floating_point():
                h = h.reshape(-1, h.shape[-1])[rows]
            else:
                raise ValueError(f"rows must be a (B, L) bool mask or 1-D positions, got {rows.dtype} {tuple(rows.shape)}")
        with self._autocast(x.device):
            return self.output_layer.linear(h)[..., : self.vocab_size]


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> DiT:
    return DiT(resolve_model_config(cfg))
