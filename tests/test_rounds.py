"""The shared round mechanism (methods/rounds.py): SDTT on it keeps its losses and rounds bit for bit (values recorded
with SDTT's own round code, before the refactor, revision b32b987), state and schedule checks, the per-round
students a method lists for eval and the demo."""

from __future__ import annotations

import pytest
import torch

from ddistill.methods.base import StepContext
from ddistill.methods.rounds import RoundSchedule, RoundTracker
from ddistill.methods.sdtt import SDTT, SDTTConfig

# SDTT losses (float.hex), round and student steps of 7 optimizer steps of the run below, at b32b987.
SDTT_BEFORE_THE_SHARED_HELPER = [
    ("0x1.30a3780000000p+0", 0, 8), ("0x1.3f36140000000p-1", 0, 8), ("0x1.2bae720000000p-7", 1, 4),
    ("0x1.c020800000000p-6", 1, 4), ("0x1.1558fc0000000p-4", 2, 2), ("0x1.4789500000000p-5", 2, 2),
    ("0x1.3fd9be0000000p-5", 2, 2),
]  # fmt: skip


def test_sdtt_losses_and_rounds_are_unchanged_by_the_shared_helper():
    vocab, mask = 7, 6
    torch.manual_seed(0)
    student, teacher = torch.nn.Embedding(vocab, vocab), torch.nn.Embedding(vocab, vocab)
    shift = torch.linspace(-1, 1, vocab)

    def s_net(x, sigma, rows=None):
        logits = student(x) + sigma[:, None, None] * shift
        return logits if rows is None else logits[rows]

    def t_net(x, sigma):
        with torch.no_grad():
            return teacher(x) + sigma[:, None, None] * shift

    class Control:  # a real teacher swap
        def copy_weights(self, dst, src, *, use_ema=False):
            teacher.load_state_dict(student.state_dict())

        def reset_optimizer(self, name):
            raise AssertionError("not configured")

    opt = torch.optim.SGD(student.parameters(), lr=5.0)
    method = SDTT(SDTTConfig(initial_teacher_steps=16, num_rounds=3, steps_per_round=2), vocab_size=vocab,
                  mask_id=mask)
    batch = torch.randint(0, mask, (4, 12), generator=torch.Generator().manual_seed(3))
    seen = []
    for step in range(7):
        ctx = StepContext(step=step, micro_step=0, global_offset=0, global_batch_size=4,
                          generator=torch.Generator().manual_seed(100 + step), device=torch.device("cpu"), rank=0,
                          world_size=1)
        out = method.step({"student": s_net, "teacher": t_net}, batch, ctx)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        seen.append((out.losses["student"].item().hex(), method.round, method.student_steps))
        method.on_step_end(step, Control())
    assert seen == SDTT_BEFORE_THE_SHARED_HELPER
    assert method.state_dict() == {"round": 2, "student_steps": 2, "teacher_updated_at": 4, "num_teacher_steps": 2,
                                   "initial_teacher_steps": 16, "steps_per_round": 2, "num_rounds": 3}


def test_tracker_state_checks_and_students():
    schedule = RoundSchedule(num_rounds=3, steps_per_round=4)
    assert [schedule.round_of_step(s) for s in (0, 3, 4, 11, 12, 40)] == [0, 0, 1, 2, 2, 2]
    assert schedule.boundary_steps() == [4, 8, 12]
    tracker = RoundTracker(schedule, extra_signature={"base": 7}, method="X")
    with pytest.raises(RuntimeError, match="X is in round 0 but optimizer step 4 belongs to round 1"):
        tracker.check_step(4)
    state = {**tracker.state_dict(), "round": 2, "teacher_updated_at": 8}
    tracker.load_state_dict(state)
    assert (tracker.round, tracker.teacher_updated_at) == (2, 8)
    with pytest.raises(ValueError, match="method.base=8 differs from the checkpoint's 7"):
        RoundTracker(schedule, extra_signature={"base": 8}, method="X").load_state_dict(state)
    with pytest.raises(ValueError, match="outside"):
        tracker.load_state_dict({**state, "round": 3})
    with pytest.raises(ValueError, match="steps_per_round"):
        RoundSchedule(num_rounds=1, steps_per_round=0)


def test_sdtt_lists_its_round_students():
    method = SDTT(SDTTConfig(), vocab_size=50258, mask_id=50257)
    students = method.eval_students()
    assert [(s.label, s.step, s.network, s.sampler, s.trained_steps) for s in students] == [
        (f"round {r}", 10_000 * r, "student", "mdlm", 1024 // 2**r) for r in range(1, 8)
    ]
