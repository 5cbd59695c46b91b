"""Where a step leaves the GPU idle: the idle gaps of a torch.profiler Chrome trace, attributed to host code.

A step whose kernels take K ms but which runs S > K ms leaves the GPU idle for S − K ms. That time is host time the
device waits on: a host sync followed by launch latency, or host code (Python hooks, per-tensor loops) that launches
slower than the GPU retires work. The trace answers which:

* busy intervals = the union of the device's kernel, memcpy and memset events; a gap is the time between two busy
  intervals (only gaps of at least ``min_gap_us`` count, to skip the launch-to-launch jitter of a busy stream);
* the gap ends when the next device event starts; the host launched that event at the start of its runtime call
  (``cudaLaunchKernel`` …, or the driver's ``cuLaunchKernel`` for Triton kernels; joined by the trace's
  ``correlation`` id), so the host code that was running at that launch
  is what the GPU waited for: the innermost Python frame outside torch of the launching thread (a trace recorded
  with ``with_stack=True``, which also slows the host), else the outermost operator or ``record_function`` range;
* a gap that contains a blocking runtime call (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
  ``cudaEventSynchronize`` or a synchronous ``cudaMemcpy``) ending inside it is marked "after a sync": the host
  waited for the device to drain, then had to launch the next work from scratch.

``idle_report`` sums gap time by the launching frame and returns the table; ``find_gaps`` gives the raw gaps.
``phase_report`` sets each ``record_function`` range of the trainer (``ddistill.<phase>.<part>``: method step,
backward, optimizer step, EMA) against the device work launched inside it: the range's host time, the number and
summed duration of those kernels, and the device span from the first to the last of them. A part whose host time
exceeds its kernel time is host-bound (an H200 trace of the MDLM `small` step: backward 42.3 ms of host time for
37.7 ms of kernels, the optimizer step 8.7 for 3.0). ``print_idle_gaps`` records the traces of a step function and
prints the reports; ``bench_engine.py --profile`` and ``bench_dimo_step.py --profile`` call it.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# Launches: the runtime's cudaLaunchKernel … and the driver's cuLaunchKernel (Triton's and Inductor's kernels)
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Frames inside these packages explain nothing about *our* host work; the report names the innermost frame outside
# them (falling back to the innermost frame when the whole stack is library code).
LIBRARY_FRAME = re.compile(r"(^|/)(torch|triton|contextlib|threading|functools|<built-in)|^<built-in|^built-in")


def _blocking(name: str) -> bool:
    """A runtime call that returns only when the device has caught up (cudaMemcpyAsync alone does not)."""
    return name in BLOCKING_CALLS or (name.startswith("cudaMemcpy") and "Async" not in name)


@dataclass(frozen=True)
class Gap:
    start_us: float  # the device went idle
    end_us: float  # the next device event began
    launched_by: str  # the attributed Python frame at the next event's launch ("?" if unknown)
    stack: tuple[str, ...]  # innermost first, up to 6 frames
    after_sync: bool

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


def _events(trace: dict | str | Path) -> list[dict]:
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e and "dur" in e]


def _attributed(stack: tuple[str, ...], op_stack: tuple[str, ...]) -> str:
    """The innermost Python frame outside the libraries; without Python frames (a trace without with_stack), the
    outermost operator or record_function range enclosing the launch."""
    for frame in stack:
        if not LIBRARY_FRAME.search(frame):
            return frame
    if stack:
        return stack[0]
    return op_stack[-1] if op_stack else "?"


def _stacks_at(frames: list[dict], queries: list[tuple[float, object]]) -> dict[tuple[float, object], tuple]:
    """The frames (Python functions or operators; innermost first, at most 6) that enclose each (time, thread) query:
    one sweep per thread over its frames in start order, keeping the stack of open frames (a thread's frames nest)."""
    out: dict[tuple[float, object], tuple] = {}
    by_tid: dict[object, list[dict]] = {}
    for f in frames:
        by_tid.setdefault(f.get("tid"), []).append(f)
    for tid, mine in by_tid.items():
        mine.sort(key=lambda f: (float(f["ts"]), -float(f["dur"])))
        times = sorted({t for t, q_tid in queries if q_tid == tid})
        open_: list[tuple[float, str]] = []  # (end, name), outermost first
        i = 0
        for t in times:
            while i < len(mine) and float(mine[i]["ts"]) <= t:
                f = mine[i]
                begin = float(f["ts"])
                while open_ and open_[-1][0] < begin:
                    open_.pop()
                open_.append((begin + float(f["dur"]), f["name"]))
                i += 1
            while open_ and open_[-1][0] < t:
                open_.pop()
            out[(t, tid)] = tuple(name for end, name in reversed(open_) if end >= t)[:6]
    return out


def find_gaps(trace: dict | str | Path, *, min_gap_us: float = 5.0) -> list[Gap]:
    """The device's idle gaps of at least `min_gap_us` between its first and last event, oldest first."""
    events = _events(trace)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATEGORIES), key=lambda e: float(e["ts"]))
    if not device:
        return []
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}  # fmt: skip
    blocking = sorted((float(e["ts"]) + float(e["dur"]) for e in events
                       if e.get("cat") == "cuda_runtime" and _blocking(e.get("name", ""))))  # fmt: skip
    frames = [e for e in events if e.get("cat") == "python_function"]
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]
    pending: list[tuple[float, float, dict | None]] = []  # (device idle start, next event's start, launch) per gap
    busy_until = float(device[0]["ts"]) + float(device[0]["dur"])
    for event in device[1:]:
        start = float(event["ts"])
        if start - busy_until >= min_gap_us:
            pending.append((busy_until, start, launches.get(event.get("args", {}).get("correlation"))))
        busy_until = max(busy_until, start + float(event["dur"]))
    queries = [(float(l["ts"]), l.get("tid")) for _, _, l in pending if l is not None]
    stacks, op_stacks = _stacks_at(frames, queries), _stacks_at(ops, queries)
    gaps: list[Gap] = []
    for idle_from, start, launch in pending:
        key = (float(launch["ts"]), launch.get("tid")) if launch is not None else None
        stack, op_stack = stacks.get(key, ()), op_stacks.get(key, ())
        i = bisect.bisect_right(blocking, idle_from)
        after_sync = i < len(blocking) and blocking[i] <= start
        gaps.append(Gap(idle_from, start, _attributed(stack, op_stack), stack or op_stack, after_sync))
    return gaps


def idle_report(trace: dict | str | Path, *, steps: int, min_gap_us: float = 5.0, top: int = 25) -> str:
    """A text table: per step, device busy/idle time, and the idle time by launching frame (largest first)."""
    events = _events(trace)
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if not device:
        return "no device events in the trace"
    first = min(float(e["ts"]) for e in device)
    last = max(float(e["ts"]) + float(e["dur"]) for e in device)
    gaps = find_gaps({"traceEvents": events}, min_gap_us=min_gap_us)
    idle = sum(g.us for g in gaps)
    by_frame: dict[str, list[float]] = {}
    for g in gaps:
        key = g.launched_by + ("  [after a sync]" if g.after_sync else "")
        by_frame.setdefault(key, []).append(g.us)
    lines = [f"device span {(last - first) / 1e3 / steps:.2f} ms a step, idle in gaps >= {min_gap_us:g} us: "
             f"{idle / 1e3 / steps:.2f} ms a step ({len(gaps) / steps:.0f} gaps a step, "
             f"{sum(g.after_sync for g in gaps) / steps:.1f} after a sync)",
             f"{'idle ms/step':>12s} {'gaps/step':>9s} {'max us':>8s}  launched by"]  # fmt: skip
    for key, durations in sorted(by_frame.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(durations) / 1e3 / steps:12.3f} {len(durations) / steps:9.1f} {max(durations):8.0f}  {key}")
    return "\n".join(lines)


def phase_report(trace: dict | str | Path, *, steps: int, prefix: str = "ddistill.") -> str:
    """A text table, per step: for each `record_function` range named `prefix`…, its host time, and the device
    events launched inside it (on any thread): their count, summed duration and span (first start to last end)."""
    events = _events(trace)
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}  # fmt: skip
    device = sorted(((launches[e["args"]["correlation"]], e) for e in events
                     if e.get("cat") in DEVICE_CATEGORIES and e.get("args", {}).get("correlation") in launches),
                    key=lambda pair: pair[0])  # fmt: skip
    launch_times = [t for t, _ in device]
    rows: dict[str, list[float]] = {}  # name -> [host µs, events, busy µs, span µs]
    for r in (e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(prefix)):
        begin, end = float(r["ts"]), float(r["ts"]) + float(r["dur"])
        inside = [e for _, e in device[bisect.bisect_left(launch_times, begin):bisect.bisect_right(launch_times, end)]]
        row = rows.setdefault(r["name"], [0.0, 0.0, 0.0, 0.0])
        row[0] += end - begin
        if inside:
            row[1] += len(inside)
            row[2] += sum(float(e["dur"]) for e in inside)
            row[3] += max(float(e["ts"]) + float(e["dur"]) for e in inside) - min(float(e["ts"]) for e in inside)
    if not rows:
        return f"no {prefix}* ranges in the trace"
    lines = [f"{'host ms':>8s} {'kernels':>8s} {'kernel ms':>9s} {'span ms':>8s}  range (per step)"]
    for name, (host, count, busy, span) in rows.items():
        lines.append(f"{host / 1e3 / steps:8.2f} {count / steps:8.0f} {busy / 1e3 / steps:9.2f} {span / 1e3 / steps:8.2f}"
                     f"  {name}")
    return "\n".join(lines)


def print_idle_gaps(step, steps: int, work: Path) -> None:
    """The GPU's idle time per step and the host code it waited on (gpu_gaps.py), from two traces: one without Python
    stacks (the undistorted idle total, attributed to operators) and one with them (attributed to Python frames;
    tracing every call slows the host, so its idle total is an upper bound)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    for with_stack in (False, True):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=with_stack) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
        trace = work / f"trace-stack{int(with_stack)}.json"
        prof.export_chrome_trace(str(trace))
        print(f"== GPU idle over {steps} steps, {'with' if with_stack else 'without'} Python stacks", flush=True)
        print(idle_report(trace, steps=steps), flush=True)
        if not with_stack:  # host time against kernel time, range by range (undistorted by stack tracing)
            print(f"== the trainer's ranges over {steps} steps, without Python stacks", flush=True)
            print(phase_report(trace, steps=steps), flush=True)
