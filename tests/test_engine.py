"""Engine pieces that need no process group: run config, LR schedule, EMA, checkpoint files, SLURM env mapping."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ddistill.config import ConfigError
from ddistill.engine import checkpoint as ckpt
from ddistill.engine.distributed import expand_nodelist, torch_env_from_slurm
from ddistill.engine.ema import EMA
from ddistill.engine.run_config import load_run_config
from ddistill.engine.trainer import derive_seed, lr_at

MINIMAL = ["model.size=test", "method.name=mdlm", "train.max_steps=10", "train.global_batch_size=8",
           "train.micro_batch_size=2", "train.out_dir=/tmp/x"]


def _without(prefix):
    return [o for o in MINIMAL if not o.startswith(prefix)]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (MINIMAL + ["train.max_stepz=3"], "train.max_stepz"),
        (MINIMAL + ["optim.schedule=linear"], "optim.schedule"),
        (MINIMAL + ["method.loss_impl=chunky"], "method.loss_impl"),
        (MINIMAL + ["optim.lr=fast"], "optim.lr"),
        (MINIMAL + ["deepspeed.trained_zero_stage=3"], "deepspeed.trained_zero_stage"),
        (MINIMAL + ["logging.wandb=maybe"], "logging.wandb"),
        (MINIMAL + ["method.shedule=cosine"], "method.shedule"),
        (_without("method.name") + ["method.name=sdtX"], "method.name"),
        (MINIMAL + ["model.size=huge"], "model.size"),
        (MINIMAL + ["train.micro_batch_size=3"], "train.micro_batch_size"),
        (MINIMAL + ["data.dataset=nope"], "data"),
        (MINIMAL + ["bogus=1"], "bogus"),
        (_without("train.max_steps"), "train.max_steps"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert key in str(err.value)


def test_config_roundtrip_and_experiment_files(tmp_path):
    from ddistill.config import dump_yaml

    cfg = load_run_config(None, MINIMAL + ["method.loss_impl=torch", "optim.betas=[0.9,0.95]"])
    assert cfg.method.config.time_conditioning is False and cfg.optim.betas == (0.9, 0.95)
    dump_yaml(cfg.to_dict(), tmp_path / "c.yaml")
    again = load_run_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    owt = load_run_config("configs/experiments/owt_mdlm_small.yaml")
    assert (owt.train.global_batch_size, owt.optim.lr, owt.optim.warmup_steps, owt.train.ema_decay) == (
        512, 3e-4, 2500, 0.9999)
    assert owt.model.hidden_size == 768 and owt.data.block_size == 1024 and owt.train.max_steps == 1_000_000
    usdm = load_run_config("configs/experiments/owt_usdm_small.yaml")
    assert usdm.method.name == "usdm" and usdm.method.config.time_conditioning is True
    tiny = load_run_config("configs/experiments/classics_mdlm_tiny.yaml", ["train.global_batch_size=32"])
    assert tiny.model.size == "tiny" and tiny.data.block_size == 128 and tiny.train.global_batch_size == 32


def test_lr_schedule_warmup_constant_and_cosine():
    kw = dict(lr=1.0, warmup_steps=4, min_lr=0.1, max_steps=14)
    assert [lr_at(s, schedule="constant", **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = [lr_at(s, schedule="cosine", **kw) for s in range(4, 15)]
    assert cos[0] == pytest.approx(1.0) and cos[5] == pytest.approx(0.55) and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos, cos[1:]))


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(1, s, r) for s in range(50) for r in range(4)}) == 200
    assert 0 <= derive_seed(7) < 2**63


def test_ema_matches_float64_recursion_and_keeps_configured_decay(caplog):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.9)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    for k in range(1, 30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(net)
        d = min(0.9, (1 + k) / (10 + k))
        for n, p in net.named_parameters():
            ref[n] = d * ref[n] + (1 - d) * p.detach().double()
    for n in ref:
        torch.testing.assert_close(ema.shadow[n].double(), ref[n], rtol=1e-6, atol=1e-6)
    state = ema.state_dict()
    state["decay"] = 0.9999  # e.g. a base-model checkpoint: must not override a distillation run's decay
    other = EMA(net, 0.99)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert other.decay == 0.99 and other.num_updates == 29
    assert "differs from the configured decay" in caplog.text
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ref)


def test_ema_follows_swapped_parameter_data_a_cast_and_another_module():
    """The update's cached parameter lists (ema.py) see what ZeRO-2 does to a module (each Parameter's .data
    replaced by a view of one flat buffer), a cast of the module to bf16, and a different module passed in."""
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.5, warmup=False)
    ref = {n: p.detach().double().clone() for n, p in net.named_parameters()}

    def step(module):
        ema.update(module)
        for n, p in module.named_parameters():
            ref[n] = 0.5 * ref[n] + 0.5 * p.detach().double()
        for n in ref:
            torch.testing.assert_close(ema.shadow[n].double(), ref[n], rtol=1e-6, atol=1e-6)

    step(net)
    flat = torch.randn(8)
    net.weight.data, net.bias.data = flat[:6].view(2, 3), flat[6:]  # new storage, same Parameter objects
    step(net)
    with torch.no_grad():
        flat.mul_(3.0)  # written through the views, as the optimizer writes its flat buffer
    step(net)
    net.to(torch.bfloat16)
    step(net)
    other = torch.nn.Linear(3, 2)
    step(other)
    assert ema.num_updates == 5


def _fake_checkpoint(root, step, payload=b"x"):
    tmp = root / f"step_{step:08d}.tmp"
    (tmp / "ds").mkdir(parents=True)
    (tmp / "ds" / "a.bin").write_bytes(payload * 1000)
    (tmp / "trainer.pt").write_bytes(b"step %d" % step)
    ckpt.finalize(tmp, ckpt.checkpoint_dir(root, step), step)


def test_checkpoint_manifest_detects_damage_and_falls_back(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_00000008.tmp").mkdir()  # an interrupted write is never a candidate
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6]
    assert ckpt.verify_checkpoint(tmp_path / "step_00000006") == 6
    path, problems = ckpt.find_latest_valid(tmp_path)
    assert path.name == "step_00000006" and problems == []
    # truncate a file of step 6 -> checksum mismatch, step 4 is used
    victim = tmp_path / "step_00000006" / "ds" / "a.bin"
    victim.write_bytes(victim.read_bytes()[:10])
    # remove the manifest of step 4 -> incomplete, step 2 is used
    (tmp_path / "step_00000004" / ckpt.MANIFEST).unlink()
    path, problems = ckpt.find_latest_valid(tmp_path)
    assert path.name == "step_00000002"
    assert "step_00000006" in problems[0] and "ds/a.bin" in problems[0]
    assert "step_00000004" in problems[1] and "MANIFEST" in problems[1]
    # same size, different bytes is caught too
    _fake_checkpoint(tmp_path, 10, payload=b"y")
    victim = tmp_path / "step_00000010" / "ds" / "a.bin"
    victim.write_bytes(b"z" * 1000)
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.verify_checkpoint(tmp_path / "step_00000010")
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 10]
    assert any(p.name.endswith(".tmp") for p in removed)
    manifest = json.loads((tmp_path / "step_00000006" / ckpt.MANIFEST).read_text())
    assert set(manifest["files"]) == {"ds/a.bin", "trainer.pt"}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
        ("a[1-2],b,c[09-10]", ["a1", "a2", "b", "c09", "c10"]),
        ("login-a,login-b", ["login-a", "login-b"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),  # as `scontrol show hostnames`
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torch_env_from_slurm():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242"}
    out = torch_env_from_slurm(env)
    assert out["RANK"] == "9" and out["WORLD_SIZE"] == "16" and out["LOCAL_RANK"] == "1"
    assert out["MASTER_ADDR"] == "gpu07"
    assert 20000 <= int(out["MASTER_PORT"]) <= 60000
    assert torch_env_from_slurm(env)["MASTER_PORT"] == out["MASTER_PORT"]  # same on every rank / after requeue
    assert torch_env_from_slurm({**env, "RANK": "0"}) == {}  # torchrun/deepspeed already set it
    assert torch_env_from_slurm({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"}).get("MASTER_ADDR") is None
    with pytest.raises(ValueError, match="SLURM_NTASKS"):
        torch_env_from_slurm({"SLURM_PROCID": "0"})


def test_train_main_usage_and_config_error():
    from ddistill.engine import train_main

    with pytest.raises(SystemExit):
        train_main(["--help"])
    with pytest.raises(ConfigError, match="train.max_stepz"):
        train_main(["configs/experiments/classics_mdlm_test.yaml", "--local_rank=0", "train.max_stepz=1"])
