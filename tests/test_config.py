"""The typed config machinery: YAML bases, dotted overrides, key and type errors that name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ddistill.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass(kw_only=True)
class Optim:
    lr: float = 3e-4
    schedule: Literal["constant", "cosine"] = "constant"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(kw_only=True)
class Run:
    name: str
    steps: int = 10
    bf16: bool | None = None
    optim: Optim = field(default_factory=Optim)
    extra: dict[str, Optim] = field(default_factory=dict)


def test_round_trip_and_overrides():
    data = apply_overrides({"name": "a"}, ["steps=20", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "bf16=true"])
    run = from_dict(Run, data)
    assert run.steps == 20 and run.optim.lr == 1e-3 and run.optim.betas == (0.8, 0.9) and run.bf16 is True
    assert from_dict(Run, to_dict(run)) == run


def test_yaml_scientific_notation_without_dot_is_a_float():
    assert from_dict(Run, {"name": "a", "optim": {"lr": "3e-4"}}).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "a", "stpes": 3}, "unknown config key 'stpes' (did you mean 'steps'?)"),
        ({"name": "a", "optim": {"schedule": "linear"}}, "optim.schedule: 'linear' is not allowed; choose one of ['constant', 'cosine']"),
        ({"name": "a", "steps": "many"}, "steps: expected an integer, got 'many'"),
        ({"name": "a", "bf16": "yes"}, "bf16: 'yes' does not fit"),
        ({"steps": 3}, "missing required config key(s): ['name']"),
        ({"name": "a", "optim": 3}, "optim: expected a section (Optim)"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Run, data)
    assert message in str(err.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="steps is a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_yaml_base_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 5\noptim:\n  lr: 0.1\n  schedule: cosine\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.2\n")
    run = from_dict(Run, load_yaml(tmp_path / "child.yaml"))
    assert (run.name, run.steps, run.optim.lr, run.optim.schedule) == ("base", 5, 0.2, "cosine")
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_mapping_of_sections_is_typed():
    run = from_dict(Run, {"name": "a", "extra": {"x": {"lr": 0.5}}})
    assert run.extra == {"x": Optim(lr=0.5)}
    with pytest.raises(ConfigError, match="extra.x.schedule: 'step' is not allowed"):
        from_dict(Run, {"name": "a", "extra": {"x": {"schedule": "step"}}})
