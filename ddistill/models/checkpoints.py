"""Load and save the public DiT checkpoint layouts (MDLM arXiv 2406.07524, SDTT arXiv 2410.21035, DUO arXiv 2506.10892).

Supported sources (all hold the backbone under the `backbone.` prefix; our `DiT` state dict is the same without it):

* Hugging Face directories of `kuleshov-group/mdlm-owt`, `s-sahoo/duo`, `s-sahoo/duo-distilled`: a flat `config.json`
  (`model_type` "mdlm" | "duo", `vocab_size`, `model_length`, `hidden_dim`, `cond_dim`, `n_blocks`, `n_heads`,
  `dropout`, MDLM's `time_conditioning`, DUO's `causal`) and `model.safetensors` or `pytorch_model.bin`.
* `jdeschena/sdtt` branch directories: `model.safetensors` plus the full OmegaConf run config as `config.json`, whose
  architecture lives under `model.{hidden_size, cond_dim, length, n_blocks, n_heads, dropout}`; the vocabulary size is
  read from the weights (the run config derives it from the tokenizer).
* Lightning `.ckpt` files of the MDLM/DUO/SDTT trainers: `state_dict` (`backbone.*`), optional EMA
  `ema.shadow_params` (a list in `backbone.parameters()` order), run config in `hyper_parameters.config` when present.
* A hub id `owner/name` or `owner/name@revision` (e.g. `jdeschena/sdtt@teacher_1M_sm`), fetched by `snapshot_download`.

Loading is all-or-nothing: any missing, unexpected or shape-mismatched tensor raises `CheckpointMismatchError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ddistill.models.dit import MODEL_SIZES, DiT, ModelConfig, resolve_model_config

logger = logging.getLogger(__name__)

PREFIX = "backbone."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FLAVORS = ("mdlm", "duo")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# Time conditioning is not visible in the weights (σ = 0 uses the same sigma_map); run configs keep it in one of these.
_TIME_CONDITIONING_KEYS = (
    ("time_conditioning",),
    ("algo", "time_conditioning"),
    ("parameterization", "time_conditioning"),
)


class CheckpointMismatchError(ValueError):
    """The checkpoint tensors do not match the model its config describes."""


def load_pretrained(
    path: str | Path,
    *,
    use_ema: bool = False,
    map_location: str | torch.device = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> tuple[DiT, ModelConfig]:
    """Load a public checkpoint (HF dir, sdtt branch dir, Lightning `.ckpt`, or hub id) into a fresh `DiT`.

    `overrides` replaces ModelConfig fields after the checkpoint's config is read (e.g. `{"dropout": 0.0}`, or
    `{"time_conditioning": False}` for a Lightning ckpt whose run config does not record it). Returns the model in
    eval mode, fp32, on `map_location`, and its resolved config.
    """
    local = Path(path)
    if not local.exists():
        local = _download(str(path))
    shadow: list[torch.Tensor] | None = None
    if local.is_dir():
        if use_ema:
            raise ValueError(f"use_ema=True needs a Lightning .ckpt; {local} is a directory with one set of weights")
        fields, state = _read_directory(local, map_location)
    else:
        fields, state, shadow = _read_lightning(local, use_ema, map_location)
    if overrides:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"overrides: unknown key(s) {unknown}; allowed keys are {sorted(known)}")
        fields.update(overrides)
    cfg = _config_from_fields(fields, state, source=str(path))
    with torch.device("meta"):
        model = DiT(cfg)
    if shadow is not None:
        state = _apply_ema(model, state, shadow, str(path))
    load_backbone_state(model, state, source=str(path))
    return model.eval(), cfg


def load_backbone_state(model: DiT, state: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Strictly load an unprefixed public state dict into `model`.

    A model built on the meta device gets the checkpoint tensors assigned (cast to fp32, on their device); a
    materialised model has them copied into its existing parameters (its dtype/device are kept).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        lines = [f"checkpoint {source} does not match the model its config describes ({_describe(model.config)}):"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {w}" for w in wrong]
        raise CheckpointMismatchError("\n".join(lines))
    head_dim = model.config.hidden_size // model.config.n_heads
    rope = 1.0 / (10_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not torch.allclose(state["rotary_emb.inv_freq"].float().cpu(), rope, rtol=1e-5, atol=0.0):
        raise CheckpointMismatchError(f"checkpoint {source}: rotary_emb.inv_freq is not the base-10000 RoPE table")
    on_meta = any(t.is_meta for t in model.state_dict().values())
    if on_meta:  # a fresh meta-device model takes the checkpoint tensors themselves, in fp32
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=True, assign=on_meta)
    assert not result.missing_keys and not result.unexpected_keys


def save_pretrained(model: DiT, out_dir: str | Path, flavor: str = "mdlm", *, tokenizer: str = "gpt2") -> Path:
    """Write `config.json` + `model.safetensors` (keys `backbone.*`, public unpadded shapes) in the HF layout.

    `config.json` also names the `tokenizer` the ids belong to (a `data.tokenizer` name; read back by
    `checkpoint_tokenizer`).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"flavor={flavor!r}; allowed values: {list(FLAVORS)}")
    cfg = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": flavor,
        "vocab_size": cfg.vocab_size,
        "model_length": cfg.length,
        "hidden_dim": cfg.hidden_size,
        "cond_dim": cfg.cond_dim,
        "n_blocks": cfg.n_blocks,
        "n_heads": cfg.n_heads,
        "dropout": cfg.dropout,
        "time_conditioning": cfg.time_conditioning,
        "causal": cfg.causal,
        "tokenizer": tokenizer,
    }
    if flavor == "duo":
        config["var_min"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def checkpoint_tokenizer(path: str | Path) -> str:
    """The tokenizer name (`data.tokenizer`) whose ids a checkpoint's model reads and writes.

    Our exports record it in `config.json` (`tokenizer`), training checkpoint directories in `config.yaml`
    (`data.tokenizer`); public MDLM/DUO/SDTT checkpoints and Lightning files record none and use GPT-2's.
    """
    local = Path(path)
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text())
        name = config.get("tokenizer") if "model_type" in config else None  # not an sdtt branch's run config
        return name if isinstance(name, str) else "gpt2"
    if (local / "config.yaml").is_file():
        from ddistill.config import load_yaml

        return load_yaml(local / "config.yaml").get("data", {}).get("tokenizer", "gpt2")
    return "gpt2"


# ----------------------------------------------------------------------------------------------------------------------


def _describe(cfg: ModelConfig) -> str:
    return (
        f"hidden_size={cfg.hidden_size}, n_blocks={cfg.n_blocks}, n_heads={cfg.n_heads}, cond_dim={cfg.cond_dim}, "
        f"vocab_size={cfg.vocab_size}, causal={cfg.causal}"
    )


def _download(name: str) -> Path:
    if not _HUB_ID.match(name):
        raise FileNotFoundError(f"checkpoint path {name!r} does not exist (nor is it a hub id 'owner/name[@revision]')")
    repo_id, _, revision = name.partition("@")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision or None, allow_patterns=["config.json", *WEIGHT_FILES]
            )
        )
    except Exception as err:  # offline mode, missing repo/revision, network: all mean "not available here"
        raise FileNotFoundError(
            f"checkpoint {name!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"(offline mode or network/repo error: {type(err).__name__}: {err}). Download it beforehand and pass the "
            f"local directory."
        ) from err


def _strip_prefix(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    foreign = sorted(k for k in state if not k.startswith(PREFIX))
    if foreign:
        prefixes = sorted({k.split(".", 1)[0] + "." if "." in k else k for k in foreign})
        shown = ", ".join(foreign[:20]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 20 else "")
        raise CheckpointMismatchError(
            f"checkpoint {source}: keys without the '{PREFIX}' prefix (found prefixes {prefixes}): {shown}"
        )
    return {k[len(PREFIX) :]: v for k, v in state.items()}


def _read_directory(directory: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json")
    run_config = json.loads(config_file.read_text())
    for name in WEIGHT_FILES:
        weights = directory / name
        if weights.is_file():
            break
    else:
        raise FileNotFoundError(f"{directory} has none of the weight files {list(WEIGHT_FILES)}")
    if weights.suffix == ".safetensors":
        raw = load_file(str(weights), device=str(map_location))
    else:
        raw = torch.load(weights, map_location=map_location, weights_only=True)
    return _fields_from_run_config(run_config, str(config_file)), _strip_prefix(raw, str(weights))


class _Unresolved:
    """Stand-in for a pickled object whose class cannot be imported here (e.g. an OmegaConf config)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Unresolved,), {"__module__": module})


_lenient_pickle = types.ModuleType("ddistill_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = pickle.load


def _read_lightning(
    path: Path, use_ema: bool, map_location: Any
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[torch.Tensor] | None]:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # Lightning pickles hyper-parameters as OmegaConf objects, which the safe unpickler refuses (and omegaconf may
        # not be installed). Fall back to a full unpickle that stubs classes it cannot import: only trusted files.
        logger.warning("%s holds non-tensor objects; loading it with weights_only=False (trusted file)", path)
        ckpt = torch.load(path, map_location=map_location, weights_only=False, pickle_module=_lenient_pickle)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    state = _strip_prefix(ckpt["state_dict"], str(path))
    fields: dict[str, Any] = {}
    hparams = ckpt.get("hyper_parameters")
    run_config = _plain_config(hparams.get("config")) if isinstance(hparams, Mapping) else None
    if run_config is not None:
        fields = _fields_from_run_config(run_config, f"{path}:hyper_parameters.config")
    elif hparams:
        logger.warning("%s: hyper_parameters.config is not readable here; architecture inferred from the weights", path)
    shadow = None
    if use_ema:
        ema = ckpt.get("ema")
        if not isinstance(ema, Mapping) or "shadow_params" not in ema:
            raise CheckpointMismatchError(f"use_ema=True but {path} has no 'ema.shadow_params'")
        shadow = list(ema["shadow_params"])
    return fields, state, shadow


def _plain_config(config: Any) -> dict[str, Any] | None:
    """A run config as nested dicts, or None when it cannot be read (absent, or an unimportable class)."""
    if isinstance(config, dict):
        return config
    if type(config).__module__.startswith("omegaconf") and not isinstance(config, _Unresolved):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(config, resolve=True)
    return None


def _apply_ema(
    model: DiT, raw: dict[str, torch.Tensor], shadow: list[torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Replace the parameters in `raw` by the EMA shadow params, matched in registration (= parameters()) order."""
    public = model.state_dict()
    names = [name for name, _ in model.named_parameters()]
    if len(shadow) != len(names):
        raise CheckpointMismatchError(
            f"{source}: ema.shadow_params has {len(shadow)} tensors but the model ({_describe(model.config)}) "
            f"has {len(names)} parameters"
        )
    wrong = [
        f"{name}: ema {tuple(t.shape)} vs model {tuple(public[name].shape)}"
        for name, t in zip(names, shadow)
        if tuple(t.shape) != tuple(public[name].shape)
    ]
    if wrong:
        raise CheckpointMismatchError(f"{source}: ema.shadow_params shape mismatch:\n  " + "\n  ".join(wrong))
    return {**raw, **dict(zip(names, shadow))}


def _lookup(config: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _fields_from_run_config(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map a flat HF config or a nested OmegaConf run config onto ModelConfig fields."""
    if "model_type" in config:
        model_type = config["model_type"]
        if model_type not in FLAVORS:
            raise ValueError(f"{source}: model_type={model_type!r}; allowed values: {list(FLAVORS)}")
        flat = {"vocab_size": "vocab_size", "length": "model_length", "hidden_size": "hidden_dim",
                "cond_dim": "cond_dim", "n_blocks": "n_blocks", "n_heads": "n_heads", "dropout": "dropout"}  # fmt: skip
        absent = [key for key in flat.values() if key not in config]
        if absent:
            raise ValueError(f"{source}: model_type={model_type!r} config lacks key(s) {absent}")
        fields = {
            **{ours: config[theirs] for ours, theirs in flat.items()},
            "causal": bool(config.get("causal", False)),
            # MDLM's HF config records it (false for mdlm-owt); DUO is always conditioned on σ.
            "time_conditioning": bool(config.get("time_conditioning", model_type == "duo")),
        }
        return fields
    model = config.get("model")
    if isinstance(model, Mapping) and "hidden_size" in model:
        # Whatever is absent here is taken from the weight shapes (or rejected) by _config_from_fields.
        keys = ("hidden_size", "cond_dim", "length", "n_blocks", "n_heads", "dropout")
        fields = {k: model[k] for k in keys if k in model}
        if _lookup(config, ("algo", "name")) == "ar" or config.get("parameterization") == "ar":
            fields["causal"] = True
        for key_path in _TIME_CONDITIONING_KEYS:
            value = _lookup(config, key_path)
            if value is not None:
                fields["time_conditioning"] = bool(value)
                break
        return fields
    raise ValueError(
        f"{source}: unrecognised config; expected a flat HF config with 'model_type' or a run config with "
        f"'model.hidden_size'"
    )


def _fields_from_weights(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture implied by the tensor shapes (head count via the RoPE table: head_dim = 2·len(inv_freq))."""
    fields: dict[str, Any] = {"causal": "sigma_map.mlp.0.weight" not in state}
    if "vocab_embed.embedding" in state:
        fields["vocab_size"], fields["hidden_size"] = (int(n) for n in state["vocab_embed.embedding"].shape)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        fields["n_blocks"] = max(blocks) + 1
    if "rotary_emb.inv_freq" in state and "hidden_size" in fields:
        fields["n_heads"] = max(1, fields["hidden_size"] // (2 * state["rotary_emb.inv_freq"].numel()))
    if "sigma_map.mlp.0.weight" in state:
        fields["cond_dim"] = int(state["sigma_map.mlp.0.weight"].shape[0])
    return fields


def _config_from_fields(fields: dict[str, Any], state: Mapping[str, torch.Tensor], *, source: str) -> ModelConfig:
    """Config from the checkpoint's own config, completed (never overridden) by what the weights imply.

    The strict state-dict comparison afterwards catches a config that disagrees with the weights.
    """
    fields = {**_fields_from_weights(state), **fields}
    required = ("hidden_size", "n_blocks", "n_heads", "vocab_size")
    absent = [k for k in required if k not in fields]
    if absent:
        raise ValueError(f"{source}: neither the config nor the weights give {absent}; pass them via overrides=")
    if fields["causal"]:
        fields.setdefault("time_conditioning", False)
    elif "time_conditioning" not in fields:
        raise ValueError(
            f"{source}: the run config does not record time_conditioning (looked at "
            f"{['.'.join(p) for p in _TIME_CONDITIONING_KEYS]}); pass overrides={{'time_conditioning': ...}}"
        )
    arch = ("hidden_size", "n_blocks", "n_heads", "cond_dim")
    size = next((name for name, preset in MODEL_SIZES.items() if all(preset[k] == fields.get(k) for k in arch)), None)
    if size is None:  # not a named size: every field explicit (the "test" preset then fills nothing but gaps)
        size = "test"
        fields.setdefault("cond_dim", MODEL_SIZES["small"]["cond_dim"])
    fields.setdefault("length", MODEL_SIZES["small"]["length"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return resolve_model_config(ModelConfig(size=size, **{k: v for k, v in fields.items() if k in known}))
