"""The benchmark scripts' CPU smoke modes: they run end to end, and the kernel and torch paths of the end-to-end
training-step benchmark train the same model to the same loss (a second, independent path through both losses)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-save"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _field(line: str, key: str) -> str:
    match = re.search(rf"'{key}': '?([^,'}}]+)", line)
    assert match, (key, line)
    return match.group(1)


def test_bench_dit_cpu_smoke():
    lines = _run("bench_dit.py", "--size", "test", "--batch", "2", "--length", "32", "--vocab", "1001",
                 "--sampler-steps", "3", "--iters", "1", "--warmup", "0", "--device", "cpu").splitlines()
    whats = [_field(line, "what") for line in lines]
    assert whats == ["train fwd+bwd (MDLM loss)", "sample mdlm [torch]", "sample duo [torch]"]  # auto: torch on CPU
    assert all(float(_field(line, "tokens_per_s")) > 0 for line in lines)
    assert int(_field(lines[1], "nfe")) <= 3  # cached MDLM sampler: at most one call per step
    assert int(_field(lines[2], "nfe")) == 4  # DUO: 3 steps + the greedy tail


def test_bench_sampler_draw_cpu_smoke():
    lines = [line for line in _run("bench_sampler_draw.py", "--device", "cpu", "--size", "test", "--batch", "1",
                                   "--length", "4", "--vocab", "67", "--iters", "1").splitlines() if line.startswith("{")]
    rows = [(_field(line, "what"), _field(line, "impl")) for line in lines]
    assert ("duo posterior draw", "fused") in rows and ("duo posterior draw", "torch") in rows
    assert ("greedy tail", "fused") in rows and ("denoiser", "eager") in rows  # _field stops at a comma
    assert all(float(_field(line, "ms")) > 0 for line in lines)


@pytest.mark.parametrize("loss", ["mdlm", "sdtt"])
def test_bench_e2e_kernel_and_torch_paths_train_alike(loss):
    lines = _run("bench_e2e_step.py", "--device", "cpu", "--size", "test", "--vocab-size", "1001", "--batch", "2",
                 "--length", "32", "--steps", "2", "--warmup", "0", "--loss", loss).splitlines()
    rows = {_field(line, "impl"): line for line in lines if line.startswith("{")}
    assert set(rows) == {"torch", "triton"} and all(_field(r, "status") == "ok" for r in rows.values())
    torch_loss, kernel_loss = (float(_field(rows[k], "final_loss")) for k in ("torch", "triton"))
    assert kernel_loss == pytest.approx(torch_loss, rel=2e-3, abs=1e-4)  # after one AdamW step on each path's grads


def test_bench_e2e_profile_prints_the_kernel_table():
    out = _run("bench_e2e_step.py", "--device", "cpu", "--size", "test", "--vocab-size", "1001", "--batch", "2",
               "--length", "32", "--steps", "1", "--warmup", "1", "--loss", "mdlm", "--impl", "triton", "--profile")
    assert "== mdlm / triton: 1 steps ==" in out and "LinearCrossEntropyFunction" in out
    assert "'impl'" not in out  # profiling prints tables, not result rows


def test_shape_arguments(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    assert harness.parse_shape("16384x768") == (16384, 768)
    with pytest.raises(SystemExit, match="'16384-768': expected NxD"):
        harness.parse_shape("16384-768")
    harness.append_csv([{"a": 1}, {"b": 2}], tmp_path / "r.csv", ["a", "b"])
    harness.append_csv([{"a": 3, "b": 4}], tmp_path / "r.csv", ["a", "b"])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,", ",2", "3,4"]


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope"], "--method 'nope': the mdlm benchmark has ['cce', 'chunked', 'compile', 'eager', 'liger', 'triton']"),
    (["--shape", "12x"], "shape '12x': expected NxD"),
])
def test_profile_kernels_rejects_bad_arguments_before_touching_a_gpu(args, message):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_kernels.py"), "--loss", "mdlm", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr


def test_bench_duo_cpu_smoke():
    lines = [line for line in _run("bench_duo.py", "--device", "cpu", "--size", "test", "--vocab-size", "1001",
                                   "--batch", "2", "--length", "32", "--steps", "1", "--warmup", "0").splitlines()
             if line.startswith("{")]
    assert [_field(line, "case") for line in lines] == ["duo_full", "duo_topk", "duo_topk_fused", "usdm", "dcd_engine"]
    assert all(_field(line, "status") == "ok" and float(_field(line, "tokens_per_s")) > 0 for line in lines)
    assert all(float(_field(line, "final_loss")) > 0 for line in lines[:4])  # ELBOs of a fresh model are positive


def test_bench_dimo_step_cpu_smoke():
    """The DiMO step benchmark runs its three paths (baseline, engine torch, engine triton) and the replicated-teacher
    variant end to end."""
    common = ("--device", "cpu", "--size", "test", "--vocab-size", "1001", "--batch", "2", "--length", "32",
              "--steps", "1", "--warmup", "0")
    lines = [line for line in _run("bench_dimo_step.py", *common).splitlines() if line.startswith("{")]
    assert [_field(line, "impl") for line in lines] == ["baseline", "engine-torch", "engine-triton"]
    assert all(_field(line, "status") == "ok" and float(_field(line, "steps_per_s")) > 0 for line in lines)
    (line,) = [line for line in _run("bench_dimo_step.py", *common, "--impl", "engine-torch", "--frozen-zero-stage",
                                     "0").splitlines() if line.startswith("{")]
    assert _field(line, "impl") == "engine-torch-z0"
