"""benchmarks/gpu_gaps.py on hand-built Chrome traces: which gaps it finds, whom it blames, and which follow a sync.

Timeline (µs) of the trace below, one host thread (tid 1) and one stream:

    kernels     k1 [0, 10)   k2 [12, 20)   k3 [50, 60)  k4 [58, 70)   k5 [100, 110)
    launches    k3 launched at 45 inside hook() inside step();  k5 at 95 inside lib frame inside norm()
    sync        cudaStreamSynchronize [61, 71)

Gaps of at least 5 µs: [20, 50) (30 µs, launched by hook, no sync in it) and [70, 100) (30 µs, after the sync that
ended at 71, launched by norm: the innermost frame outside torch). [10, 12) is 2 µs, below the threshold; k3 and k4
overlap, so [58, 60) is busy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_gaps import find_gaps, idle_report, phase_report  # noqa: E402


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1, "args": args}


def _trace():
    kernels = [(1, 0, 10), (2, 12, 8), (3, 50, 10), (4, 58, 12), (5, 100, 10)]
    events = [_x("kernel", f"k{c}", ts, dur, tid=7, correlation=c) for c, ts, dur in kernels]
    events += [_x("cuda_runtime", "cudaLaunchKernel", t, 1, correlation=c) for c, t in
               [(1, -5), (2, 5), (3, 45), (4, 46), (5, 95)]]
    events += [_x("cuda_runtime", "cudaStreamSynchronize", 61, 10), _x("cuda_runtime", "cudaMemcpyAsync", 30, 1)]
    events += [_x("python_function", "ddistill/engine/trainer.py(400): step", 0, 100),
               _x("python_function", "deepspeed/runtime/zero/stage_1_and_2.py(1414): hook", 40, 10),
               _x("python_function", "deepspeed/runtime/utils.py(880): norm", 80, 20),
               _x("python_function", "torch/nn/modules/module.py(1): _call_impl", 90, 8),
               _x("cpu_op", "aten::add_", 44, 3)]
    events.append({"ph": "i", "name": "marker", "ts": 3})  # not a complete event: ignored
    return {"traceEvents": events}


def test_gaps_their_blame_and_the_syncs(tmp_path):
    gaps = find_gaps(_trace(), min_gap_us=5)
    assert [(g.start_us, g.end_us) for g in gaps] == [(20.0, 50.0), (70.0, 100.0)]
    assert gaps[0].launched_by.endswith("hook") and not gaps[0].after_sync  # cudaMemcpyAsync does not block
    assert gaps[0].stack == ("deepspeed/runtime/zero/stage_1_and_2.py(1414): hook",
                             "ddistill/engine/trainer.py(400): step")
    assert gaps[1].launched_by.endswith("norm") and gaps[1].after_sync  # the torch frame is skipped
    assert gaps[1].stack[0].startswith("torch/")
    assert find_gaps(_trace(), min_gap_us=1.5)[0].end_us == 12.0  # the 2 µs gap counts at a lower threshold
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_trace()))
    report = idle_report(path, steps=2, min_gap_us=5).splitlines()
    assert report[0] == ("device span 0.06 ms a step, idle in gaps >= 5 us: 0.03 ms a step (1 gaps a step, "
                         "0.5 after a sync)")
    assert "hook" in report[2] and "norm  [after a sync]" in report[3]


def test_without_python_frames_the_operator_is_blamed():
    trace = _trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e.get("cat") != "python_function"]
    gaps = find_gaps(trace)
    assert gaps[0].launched_by == "aten::add_" and gaps[1].launched_by == "?"


@pytest.mark.parametrize("events", [[], [_x("cpu_op", "aten::mm", 0, 5)]])
def test_no_device_events(events):
    assert find_gaps({"traceEvents": events}) == []
    assert idle_report({"traceEvents": events}, steps=1) == "no device events in the trace"


def test_a_kernel_launched_through_the_driver_is_attributed():
    """Triton launches through the driver (cuLaunchKernel, category cuda_driver): its gap is blamed all the same."""
    trace = _trace()
    for e in trace["traceEvents"]:
        if e.get("cat") == "cuda_runtime" and e["args"].get("correlation") == 5:
            e["cat"], e["name"] = "cuda_driver", "cuLaunchKernel"
    assert find_gaps(trace)[1].launched_by.endswith("norm")


def test_phase_report_sets_each_range_against_the_kernels_launched_inside_it():
    """Two steps of two trainer ranges; kernels join their range through the launch (runtime or driver) that the
    correlation id names, whatever thread or time they run at. Per step: host ms, kernels, kernel ms, span ms."""
    events = []
    for step, t0 in enumerate((0, 1000)):
        events += [_x("user_annotation", "ddistill.step.method_step", t0, 300),
                   _x("user_annotation", "ddistill.student.backward", t0 + 300, 500),
                   _x("user_annotation", "other.range", t0, 900)]
        for i, (launch, start, dur, cat) in enumerate([(t0 + 10, t0 + 20, 100, "cuda_runtime"),
                                                       (t0 + 200, t0 + 250, 150, "cuda_driver"),
                                                       (t0 + 400, t0 + 420, 300, "cuda_runtime")]):
            c = 10 * step + i
            events += [_x(cat, "launch", launch, 2, correlation=c), _x("kernel", f"k{c}", start, dur, tid=7, correlation=c)]
    events.append(_x("kernel", "orphan", 5, 1, tid=7, correlation=99))  # no launch event: in no range
    lines = phase_report({"traceEvents": events}, steps=2).splitlines()
    assert lines[1].split() == ["0.30", "2", "0.25", "0.38", "ddistill.step.method_step"]  # span 20 -> 400
    assert lines[2].split() == ["0.50", "1", "0.30", "0.30", "ddistill.student.backward"]
    assert len(lines) == 3  # other.range is not a trainer range
    assert phase_report({"traceEvents": []}, steps=1) == "no ddistill.* ranges in the trace"
