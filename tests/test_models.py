"""DiT backbone: sizes, public state-dict layout, padded vocabulary, inputs, conditioning, attention, rotary.

References are float64 re-implementations written from the formulas (duo.md §2), brute force, or a second path.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ddistill.models import MODEL_SIZES, DiT, ModelConfig, build_model, resolve_model_config
from ddistill.models.dit import Rotary, TimestepEmbedder, apply_rotary, attention

V = 37  # tiny vocab; pads to 64 with pad_vocab_multiple=64


def _random_model(**kw) -> DiT:
    """A `test`-size model with every parameter random (the zero-inits would hide wiring bugs)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.0, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
        model.output_weight[V:].zero_()
        model.output_bias[V:].zero_()
    return model.eval()


def _meta_model(size: str, **kw) -> DiT:
    with torch.device("meta"):
        return build_model(ModelConfig(size=size, **kw))


# ---------------------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "size, expected", [("tiny", 33_789_010), ("small", 169_627_218), ("medium", 424_477_010)]
)
def test_parameter_counts_match_reference(size, expected):
    model = _meta_model(size)
    assert model.num_parameters(public=True) == expected
    pad = model.padded_vocab_size - model.vocab_size
    assert model.num_parameters(public=False) == expected + pad * (model.config.hidden_size + 1)


def test_large_is_863m_and_padding():
    model = _meta_model("large")
    assert abs(model.num_parameters() - 863e6) < 0.5e6
    assert model.padded_vocab_size == 50304 and model.vocab_size == 50258
    assert tuple(model.output_weight.shape) == (50304, 1536)


def _reference_keys(n_blocks, d, cond, v, head_dim, causal=False):
    keys = {"vocab_embed.embedding": (v, d), "rotary_emb.inv_freq": (head_dim // 2,)}
    if not causal:
        keys |= {
            "sigma_map.mlp.0.weight": (cond, 256),
            "sigma_map.mlp.0.bias": (cond,),
            "sigma_map.mlp.2.weight": (cond, cond),
            "sigma_map.mlp.2.bias": (cond,),
        }
    for i in range(n_blocks):
        b = f"blocks.{i}."
        keys |= {
            b + "norm1.weight": (d,),
            b + "attn_qkv.weight": (3 * d, d),
            b + "attn_out.weight": (d, d),
            b + "norm2.weight": (d,),
            b + "mlp.0.weight": (4 * d, d),
            b + "mlp.0.bias": (4 * d,),
            b + "mlp.2.weight": (d, 4 * d),
            b + "mlp.2.bias": (d,),
        }
        if not causal:
            keys |= {b + "adaLN_modulation.weight": (6 * d, cond), b + "adaLN_modulation.bias": (6 * d,)}
    keys |= {
        "output_layer.norm_final.weight": (d,),
        "output_layer.linear.weight": (v, d),
        "output_layer.linear.bias": (v,),
    }
    if not causal:
        keys |= {"output_layer.adaLN_modulation.weight": (2 * d, cond), "output_layer.adaLN_modulation.bias": (2 * d,)}
    return keys


@pytest.mark.parametrize("causal", [False, True])
def test_state_dict_layout_equals_reference(causal):
    model = _meta_model("small", causal=causal)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _reference_keys(12, 768, 128, 50258, 64, causal=causal)
    # Parameter registration order = the reference's parameters() order (EMA shadow params rely on it).
    names = [n for n, _ in model.named_parameters()]
    assert names == [k for k in got if k != "rotary_emb.inv_freq"]


def test_load_state_dict_accepts_public_shapes():
    src = _random_model()
    dst = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.0)).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x, sigma = torch.randint(0, V, (2, 9)), torch.rand(2)
    torch.testing.assert_close(dst(x, sigma), src(x, sigma), rtol=0, atol=0)
    assert torch.count_nonzero(dst.output_weight[V:]) == 0 and torch.count_nonzero(dst.output_bias[V:]) == 0


def test_resolve_model_config_validates():
    cfg = resolve_model_config(ModelConfig(size="small"))
    assert (cfg.hidden_size, cfg.n_blocks, cfg.n_heads, cfg.cond_dim, cfg.length) == (768, 12, 12, 128, 1024)
    assert resolve_model_config({"size": "tiny", "n_blocks": 3}).n_blocks == 3
    with pytest.raises(ValueError, match=r"model\.size='huge'.*small"):
        resolve_model_config(ModelConfig(size="huge"))
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_model_config(ModelConfig(attn_backend="xformers"))
    with pytest.raises(ValueError, match="hidden_sz"):
        resolve_model_config({"hidden_sz": 3})
    with pytest.raises(ValueError, match="n_heads"):
        resolve_model_config(ModelConfig(hidden_size=60, n_heads=7))
    assert set(MODEL_SIZES) == {"test", "tiny", "small", "medium", "large"}


# ---------------------------------------------------------------------------------------------------- output layer


def test_padded_output_matches_float64_unpadded_matmul():
    model = _random_model()
    with torch.no_grad():  # garbage in the padding must never reach the logits
        model.output_weight[V:].normal_(0, 100.0)
        model.output_bias[V:].fill_(1e4)
    x, sigma = torch.randint(0, V, (3, 11)), torch.rand(3) * 5
    logits = model(x, sigma)
    assert logits.shape == (3, 11, V)
    h = model.hidden_states(x, sigma).double()
    ref = h @ model.output_weight[:V].double().T + model.output_bias[:V].double()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)


def test_selected_rows_equal_the_full_logits_at_those_positions():
    model = _random_model().eval()
    x, sigma = torch.randint(0, V, (3, 11)), torch.rand(3)
    rows = torch.rand(3, 11, generator=torch.Generator().manual_seed(3)) < 0.4
    selected = model(x, sigma, rows)
    assert selected.shape == (int(rows.sum()), V)
    torch.testing.assert_close(selected, model(x, sigma)[rows], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="rows must have shape"):
        model(x, sigma, rows[:, :5])


def test_padded_rows_get_zero_gradient():
    model = _random_model()
    x, sigma = torch.randint(0, V, (2, 8)), torch.rand(2)
    logits = model(x, sigma)
    (logits.log_softmax(-1)[..., 0].sum() + logits.square().mean()).backward()
    assert model.output_weight.grad[:V].abs().sum() > 0
    assert torch.count_nonzero(model.output_weight.grad[V:]) == 0
    assert torch.count_nonzero(model.output_bias.grad[V:]) == 0


def test_fresh_model_outputs_zero_logits():
    torch.manual_seed(1)
    model = build_model(ModelConfig(size="test", vocab_size=V)).eval()
    out = model(torch.randint(0, V, (2, 10)), torch.rand(2))
    assert torch.count_nonzero(out) == 0
    # ... while the blocks are not trivial once adaLN is non-zero (the test above can fail).
    assert model.vocab_embed.embedding.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- inputs / time


def test_soft_input_with_peaked_logits_equals_hard_input():
    model = _random_model()
    x, sigma = torch.randint(0, V, (2, 12)), torch.rand(2)
    soft = F.one_hot(x, V).float() * 1e3  # softmax(·) is one-hot up to e^-1000
    torch.testing.assert_close(model(soft, sigma), model(x, sigma), rtol=1e-5, atol=1e-5)
    # A flat soft input is the mean embedding, which differs from any token's.
    assert not torch.allclose(model(torch.zeros(2, 12, V), sigma), model(x, sigma), atol=1e-3)


def test_soft_input_is_softmax_times_embedding_float64():
    model = _random_model()
    w = torch.randn(2, 5, V) * 3
    got = model.vocab_embed(w)
    ref = torch.softmax(w.double(), -1) @ model.vocab_embed.embedding.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_time_conditioning_switch():
    x = torch.randint(0, V, (2, 10))
    s1, s2 = torch.tensor([0.1, 2.0]), torch.tensor([3.0, 0.5])
    off = _random_model(time_conditioning=False)
    torch.testing.assert_close(off(x, s1), off(x, s2), rtol=0, atol=0)
    torch.testing.assert_close(off(x, s1), off(x, torch.zeros(2)), rtol=0, atol=0)
    on = _random_model(time_conditioning=True)
    assert not torch.allclose(on(x, s1), on(x, s2), atol=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        on(x, None)


def test_timestep_features_cos_first_float64():
    sigma = torch.tensor([0.0, 0.37, 5.0])
    feats = TimestepEmbedder.features(sigma).double()
    i = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * i / 128)
    args = sigma.double()[:, None] * f
    torch.testing.assert_close(feats, torch.cat([args.cos(), args.sin()], -1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- attention


def _manual_attention64(qkv, causal):
    q, k, v = (qkv[:, :, i].double().transpose(1, 2) for i in range(3))  # (B, H, L, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        L = q.shape[2]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    b, h, l, d = out.shape
    return out.transpose(1, 2).reshape(b, l, h * d)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_float64_manual_attention(causal):
    torch.manual_seed(2)
    qkv = torch.randn(2, 13, 3, 4, 8)
    got = attention(*qkv.unbind(2), causal=causal, backend="auto")  # CPU → sdpa
    torch.testing.assert_close(got.double(), _manual_attention64(qkv, causal), rtol=1e-5, atol=1e-5)


def test_rotary_matches_brute_force_rotation():
    torch.manual_seed(3)
    L, D = 7, 8
    rot = Rotary(D)
    x = torch.randn(1, L, 2, D, dtype=torch.float64)
    cos, sin = rot.cos_sin(L, x.device)
    got = apply_rotary(x, cos.double(), sin.double())
    ref = torch.empty_like(x)
    half = D // 2
    for p in range(L):
        for i in range(half):
            theta = p * 10000.0 ** (-2 * i / D)
            a, b = x[0, p, :, i], x[0, p, :, i + half]  # rotate-half pairs (i, i + D/2)
            ref[0, p, :, i] = a * math.cos(theta) - b * math.sin(theta)
            ref[0, p, :, i + half] = a * math.sin(theta) + b * math.cos(theta)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # Relative-position property: <R_p q, R_s k> depends only on p - s.
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs = apply_rotary(q.expand(1, L, 1, D), cos.double(), sin.double())[0, :, 0]
    ks = apply_rotary(k.expand(1, L, 1, D), cos.double(), sin.double())[0, :, 0]
    torch.testing.assert_close(qs[3] @ ks[1], qs[5] @ ks[3])


def _reference_forward64(model: DiT, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Independent float64 DiT forward from the public state dict (duo.md §2)."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    d, H = cfg.hidden_size, cfg.n_heads
    hd = d // H

    def ln(t, w):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * w

    def lin(t, name, bias=True):
        out = t @ sd[name + ".weight"].T
        return out + sd[name + ".bias"] if bias else out

    h = sd["vocab_embed.embedding"][x]
    causal = cfg.causal
    if not causal:
        s = sigma.double() if cfg.time_conditioning else torch.zeros_like(sigma, dtype=torch.float64)
        f = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
        feats = torch.cat([torch.cos(s[:, None] * f), torch.sin(s[:, None] * f)], -1)
        c = F.silu(lin(F.silu(lin(feats, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    L = x.shape[1]
    pos = torch.arange(L, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)

    def rope(t):  # (B, L, H, hd)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * ang.cos()[None, :, None] + torch.cat([-t2, t1], -1) * ang.sin()[None, :, None]

    for i in range(cfg.n_blocks):
        b = f"blocks.{i}."
        if causal:
            mods = [torch.zeros(1, 1, d, dtype=torch.float64)] * 2 + [torch.ones(1, 1, d, dtype=torch.float64)]
            mods = mods * 2
        else:
            mods = lin(c, b + "adaLN_modulation")[:, None].chunk(6, -1)
        sh1, sc1, g1, sh2, sc2, g2 = mods
        a = ln(h, sd[b + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = lin(a, b + "attn_qkv", bias=False).view(x.shape[0], L, 3, H, hd)
        qkv = torch.stack([rope(qkv[:, :, 0]), rope(qkv[:, :, 1]), qkv[:, :, 2]], 2)
        h = h + g1 * lin(_manual_attention64(qkv, causal), b + "attn_out", bias=False)
        m = ln(h, sd[b + "norm2.weight"]) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, b + "mlp.0"), approximate="tanh"), b + "mlp.2")
    z = ln(h, sd["output_layer.norm_final.weight"])
    if not causal:
        sh, sc = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
        z = z * (1 + sc) + sh
    return lin(z, "output_layer.linear")


@pytest.mark.parametrize("causal", [False, True])
def test_full_forward_matches_float64_reference(causal):
    model = _random_model(causal=causal)
    x, sigma = torch.randint(0, V, (2, 9)), torch.rand(2) * 3
    torch.testing.assert_close(model(x, sigma).double(), _reference_forward64(model, x, sigma), rtol=1e-4, atol=1e-4)


def test_causal_model_ignores_future_tokens():
    x = torch.randint(0, V, (2, 12))
    x2 = x.clone()
    x2[:, 8] = (x2[:, 8] + 1) % V
    causal = _random_model(causal=True)
    a, b = causal(x), causal(x2)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-4)
    bidir = _random_model()
    sigma = torch.rand(2)
    assert not torch.allclose(bidir(x, sigma)[:, :8], bidir(x2, sigma)[:, :8], atol=1e-4)


def test_dropout_only_in_train_mode():
    torch.manual_seed(4)
    model = _random_model()
    drop = build_model(ModelConfig(size="test", vocab_size=V, dropout=0.5))
    drop.load_state_dict(model.state_dict())
    x, sigma = torch.randint(0, V, (2, 10)), torch.rand(2)
    drop.eval()
    torch.testing.assert_close(drop(x, sigma), model(x, sigma), rtol=0, atol=0)
    drop.train()
    assert not torch.allclose(drop(x, sigma), model(x, sigma), atol=1e-4)


def test_head_dtype_is_the_output_linear_dtype():
    """Fused losses take hidden states in the dtype `forward`'s output linear computes in."""
    bf16 = build_model(ModelConfig(size="test"))
    fp32 = build_model(ModelConfig(size="test", autocast_dtype="float32"))
    assert bf16.head_dtype(torch.device("cpu")) == torch.float32  # no autocast on CPU
    assert bf16.head_dtype(torch.device("cuda")) == torch.bfloat16
    assert fp32.head_dtype(torch.device("cuda")) == torch.float32
