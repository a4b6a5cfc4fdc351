"""Training: the data a stack learns from, distillation from a teacher, LoRA fine-tuning,
and the recipe that reproduces a stack's adapters in one command.

    data.py      Alpaca and ARC rows as examples, with the fixed held-out split
    distill.py   a teacher writes every stage's targets (resumable)
    finetune.py  one LoRA adapter per stage on the shared base, written as GGUF
    recipe.py    distill + fine-tune from one config file
    cli.py       `edge-fslm distill`, `finetune`, `train-recipe`
"""
