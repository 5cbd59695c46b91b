"""CUDA paths of the eval package: judge scores on GPU match CPU, and a DiT sweep runs on the GPU."""

from __future__ import annotations

import pytest
import torch

from ddistill.diffusion.schedules import LogLinearSchedule
from ddistill.eval.judge import load_judge
from ddistill.eval.sample_eval import evaluate_sampler
from test_eval_judge import _texts, _tiny_judge_dir

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_judge_on_gpu_matches_cpu(tmp_path):
    path = str(_tiny_judge_dir(tmp_path))
    texts = _texts(9, seed=3)
    cpu = load_judge(path, device="cpu").score_texts(texts, batch_size=4)
    gpu_judge = load_judge(path, device="cuda")
    assert next(gpu_judge.model.parameters()).is_cuda
    gpu = gpu_judge.score_texts(texts, batch_size=4)
    assert gpu[1] == cpu[1]
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-4)


def test_evaluate_sampler_dit_on_gpu(tmp_path):
    from ddistill.data.tokenizer import MASK_ID, VOCAB_SIZE, get_tokenizer
    from ddistill.models.dit import ModelConfig, build_model

    judge = load_judge(str(_tiny_judge_dir(tmp_path)), device="cuda")
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="test", time_conditioning=False)).cuda()
    with torch.no_grad():  # the zero-initialised output layer makes x_θ uniform and DUO's greedy tail all token 0
        model.output_weight.normal_(0, 0.5)
    for process in ("absorbing", "uniform"):
        rows = evaluate_sampler(
            model,
            process=process,
            steps_list=[4, 8],
            num_samples=4,
            batch_size=2,
            judge=judge,
            tokenizer=get_tokenizer(),
            seed=0,
            out_dir=tmp_path / process,
            label=process,
            length=32,
            vocab_size=VOCAB_SIZE,
            schedule=LogLinearSchedule(),
            mask_id=MASK_ID,
        )
        assert [r.steps for r in rows] == [4, 8]
        assert all(r.device == torch.cuda.get_device_name() and r.num_samples == 4 for r in rows)
        assert (tmp_path / process / "sample_eval.png").stat().st_size > 0
