"""Evaluation: Gen PPL with a causal judge, unigram entropy, MAUVE, the validation NELBO, sampling sweeps, reports."""

from ddistill.eval.decode import decode_samples
from ddistill.eval.judge import CausalJudge, JudgeUnavailableError, load_judge
from ddistill.eval.metrics import ValNLL, gen_ppl, mauve_score, unigram_entropy, val_nll_bound
from ddistill.eval.report import EvalRow, markdown_table, plot_curves, read_csv, write_csv, write_markdown, write_report
from ddistill.eval.sample_eval import evaluate_sampler

__all__ = [
    "CausalJudge",
    "EvalRow",
    "JudgeUnavailableError",
    "ValNLL",
    "decode_samples",
    "evaluate_sampler",
    "gen_ppl",
    "load_judge",
    "markdown_table",
    "mauve_score",
    "plot_curves",
    "read_csv",
    "unigram_entropy",
    "val_nll_bound",
    "write_csv",
    "write_markdown",
    "write_report",
]
