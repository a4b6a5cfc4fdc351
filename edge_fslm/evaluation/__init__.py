"""Evaluation: ARC by log-likelihood and held-out instructions by text overlap, for a stack,
one stage of it, or a bare model.

    metrics.py         ROUGE-L, BLEU and exact match on instruction answers
    scoring.py         log-likelihood of continuations on a loaded model
    evaluate.py        `eval arc` and `eval instruct` as Python functions
    lm_eval_plugin.py  the model class lm-evaluation-harness runs as `--model edge-fslm`
    cli.py             `edge-fslm eval arc|instruct`
"""
