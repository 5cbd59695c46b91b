"""Public checkpoint layouts: HF (mdlm / duo), sdtt branch dirs, Lightning .ckpt (raw + EMA), strict mismatch errors."""

import json
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddistill.models import CheckpointMismatchError, ModelConfig, build_model, load_pretrained, save_pretrained

V = 37


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(size="test", vocab_size=V, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        model.output_weight[V:].zero_()
        model.output_bias[V:].zero_()
    return model.eval()


def _backbone_state(model):
    return {"backbone." + k: v.clone() for k, v in model.state_dict().items()}


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, V, (2, 10), generator=g), torch.rand(2, generator=g) * 4


def _run_config(model, **top):
    cfg = model.config
    model_section = {
        "name": "test",
        "type": "ddit",
        "hidden_size": cfg.hidden_size,
        "cond_dim": cfg.cond_dim,
        "length": cfg.length,
        "n_blocks": cfg.n_blocks,
        "n_heads": cfg.n_heads,
        "scale_by_sigma": True,
        "dropout": cfg.dropout,
        "tie_word_embeddings": False,
    }
    return {"mode": "train", "model": model_section, "tokenizer": {"name": "gpt2"}, **top}


@pytest.mark.parametrize("flavor, time_conditioning", [("mdlm", False), ("duo", True)])
def test_save_load_round_trip(tmp_path, flavor, time_conditioning):
    model = _model(time_conditioning=time_conditioning)
    save_pretrained(model, tmp_path, flavor=flavor)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == flavor and config["hidden_dim"] == 64 and config["vocab_size"] == V
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(k.startswith("backbone.") for k in saved)
    assert tuple(saved["backbone.output_layer.linear.weight"].shape) == (V, 64)  # padding never saved
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg == model.config
    x, sigma = _inputs()
    torch.testing.assert_close(loaded(x, sigma), model(x, sigma), rtol=0, atol=0)
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())
    assert torch.count_nonzero(loaded.output_weight[V:]) == 0


def test_hf_dir_with_pytorch_model_bin(tmp_path):
    model = _model(time_conditioning=False)
    c = model.config
    hf_config = {
        "model_type": "mdlm", "vocab_size": V, "model_length": c.length, "hidden_dim": c.hidden_size,
        "cond_dim": c.cond_dim, "n_blocks": c.n_blocks, "n_heads": c.n_heads, "dropout": 0.1,
        "time_conditioning": False, "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig"},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    torch.save(_backbone_state(model), tmp_path / "pytorch_model.bin")
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg.time_conditioning is False and cfg.dropout == 0.1
    x, sigma = _inputs()
    torch.testing.assert_close(loaded(x, sigma), model(x, sigma), rtol=0, atol=0)


def test_sdtt_branch_dir(tmp_path):
    model = _model(time_conditioning=False)
    (tmp_path / "config.json").write_text(json.dumps(_run_config(model, time_conditioning=False)))
    save_file(_backbone_state(model), str(tmp_path / "model.safetensors"))
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg.vocab_size == V and cfg.time_conditioning is False and cfg.n_blocks == 2
    x, sigma = _inputs()
    torch.testing.assert_close(loaded(x, sigma), model(x, sigma), rtol=0, atol=0)


def test_sdtt_dir_with_foreign_prefix_is_refused(tmp_path):
    model = _model()
    (tmp_path / "config.json").write_text(json.dumps(_run_config(model, time_conditioning=False)))
    state = {"teacher." + k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    pattern = r"prefixes \[.teacher\..\].*teacher\.blocks\.0\.attn_qkv\.weight"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_pretrained(tmp_path)


def _lightning_ckpt(model, ema_model, config):
    return {
        "epoch": 3,
        "global_step": 1000,
        "state_dict": _backbone_state(model),
        "ema": {
            "decay": 0.9999,
            "num_updates": 1000,
            # backbone.parameters() order at the public (unpadded) shapes, as the reference EMA stores them
            "shadow_params": [ema_model.state_dict()[name].clone() for name, _ in ema_model.named_parameters()],
        },
        "hyper_parameters": {"config": config},
    }


def test_lightning_ckpt_raw_and_ema(tmp_path):
    raw, ema = _model(seed=0), _model(seed=1)
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_ckpt(raw, ema, _run_config(raw, algo={"name": "duo_base", "time_conditioning": True})), path)
    x, sigma = _inputs()
    loaded, cfg = load_pretrained(path)
    assert cfg.time_conditioning is True
    torch.testing.assert_close(loaded(x, sigma), raw(x, sigma), rtol=0, atol=0)
    loaded_ema, _ = load_pretrained(path, use_ema=True)
    for (name, p), q in zip(loaded_ema.named_parameters(), ema.parameters(), strict=True):  # padded params
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(loaded_ema(x, sigma), ema(x, sigma), rtol=0, atol=0)
    assert not torch.allclose(loaded_ema(x, sigma), loaded(x, sigma))


def test_lightning_ema_count_and_shape_checked(tmp_path):
    raw = _model()
    ckpt = _lightning_ckpt(raw, raw, _run_config(raw, time_conditioning=True))
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    torch.save(ckpt, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointMismatchError, match="shadow_params has"):
        load_pretrained(tmp_path / "a.ckpt", use_ema=True)
    ckpt = _lightning_ckpt(raw, raw, _run_config(raw, time_conditioning=True))
    ckpt["ema"]["shadow_params"][1] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"sigma_map\.mlp\.0\.weight"):
        load_pretrained(tmp_path / "b.ckpt", use_ema=True)
    ckpt.pop("ema")
    torch.save(ckpt, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointMismatchError, match="ema"):
        load_pretrained(tmp_path / "c.ckpt", use_ema=True)


def test_lightning_ckpt_with_unimportable_hparams(tmp_path, monkeypatch):
    """A real Lightning ckpt pickles OmegaConf objects; without that package the weights must still load."""
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "fakeconf.py").write_text("class DictConfig:\n    def __init__(self, d):\n        self.d = d\n")
    monkeypatch.syspath_prepend(str(module_dir))
    import fakeconf

    raw = _model(time_conditioning=False)
    ckpt = _lightning_ckpt(raw, raw, None)
    ckpt["hyper_parameters"] = {"config": fakeconf.DictConfig({"model": {"hidden_size": 64}})}
    torch.save(ckpt, tmp_path / "x.ckpt")
    monkeypatch.delitem(sys.modules, "fakeconf")
    sys.path.remove(str(module_dir))
    with pytest.raises(ValueError, match="time_conditioning"):
        load_pretrained(tmp_path / "x.ckpt")
    loaded, cfg = load_pretrained(tmp_path / "x.ckpt", overrides={"time_conditioning": False})
    assert (cfg.hidden_size, cfg.n_blocks, cfg.n_heads, cfg.cond_dim) == (64, 2, 4, 32)  # inferred from weights
    x, sigma = _inputs()
    torch.testing.assert_close(loaded(x, sigma), raw(x, sigma), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not_a_field"):
        load_pretrained(tmp_path / "x.ckpt", overrides={"not_a_field": 1})


def test_causal_round_trip(tmp_path):
    model = _model(causal=True)
    save_pretrained(model, tmp_path)
    loaded, cfg = load_pretrained(tmp_path)
    assert cfg.causal and not hasattr(loaded, "sigma_map")
    x, _ = _inputs()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _saved_dir(tmp_path, model):
    save_pretrained(model, tmp_path, flavor="duo")
    return load_file(str(tmp_path / "model.safetensors"))


def test_missing_extra_and_misshaped_keys_are_listed(tmp_path):
    state = _saved_dir(tmp_path, _model())
    state.pop("backbone.blocks.1.attn_out.weight")
    state["backbone.blocks.0.extra.weight"] = torch.zeros(2)
    state["backbone.blocks.0.mlp.0.bias"] = torch.zeros(255)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing key: blocks.1.attn_out.weight" in msg
    assert "unexpected key: blocks.0.extra.weight" in msg
    assert "shape mismatch: blocks.0.mlp.0.bias: checkpoint (255,) vs model (256,)" in msg


def test_wrong_vocab_shape_reports_public_shape(tmp_path):
    state = _saved_dir(tmp_path, _model())
    state["backbone.output_layer.linear.weight"] = torch.zeros(V + 1, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    pattern = r"output_layer\.linear\.weight: checkpoint \(38, 64\) vs model \(37, 64\)"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        load_pretrained(tmp_path)


def test_config_block_count_disagreeing_with_weights(tmp_path):
    _saved_dir(tmp_path, _model())
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_blocks"] = 12
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"missing key: blocks\.11\.norm1\.weight"):
        load_pretrained(tmp_path)
    config["n_blocks"], config["n_heads"] = 2, 8  # head dim 8 → RoPE table of 4, weights have 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"rotary_emb\.inv_freq"):
        load_pretrained(tmp_path)


def test_errors_for_unavailable_sources(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="kuleshov-group/mdlm-owt"):
        load_pretrained("kuleshov-group/mdlm-owt")  # HF_HUB_OFFLINE=1 (conftest) → fails at once
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope" / "model")
    save_pretrained(_model(), tmp_path / "d")
    with pytest.raises(ValueError, match="use_ema"):
        load_pretrained(tmp_path / "d", use_ema=True)
    with pytest.raises(ValueError, match="flavor"):
        save_pretrained(_model(), tmp_path / "e", flavor="sedd")


def test_load_backbone_state_into_live_model_keeps_parameters():
    from ddistill.models import load_backbone_state

    src, dst = _model(seed=0), _model(seed=3)
    params_before = [id(p) for p in dst.parameters()]
    load_backbone_state(dst, src.state_dict())
    assert [id(p) for p in dst.parameters()] == params_before  # copied in place: optimizer references stay valid
    x, sigma = _inputs()
    torch.testing.assert_close(dst(x, sigma), src(x, sigma), rtol=0, atol=0)
    broken = dict(src.state_dict())
    broken.pop("vocab_embed.embedding")
    with pytest.raises(CheckpointMismatchError, match="missing key: vocab_embed.embedding"):
        load_backbone_state(dst, broken)


def test_flat_config_missing_key(tmp_path):
    _saved_dir(tmp_path, _model())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_dim"):
        load_pretrained(tmp_path)
