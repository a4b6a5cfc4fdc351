"""Reading the training and evaluation data: Alpaca instructions and ARC questions.

Both become ``Example`` rows with a stable id, the text a user would type (``input``)
and the gold answer (``output``), so distillation and instruction eval treat them alike.
The Alpaca split is fixed by position: the last ``ALPACA_HELD_OUT`` rows are held out
for evaluation and never distilled or trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ALPACA_HELD_OUT = 500  # the last 500 rows of alpaca_5000.json; benchmarks/quant_quality.py uses the same rows
MAX_DATA_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Example:
    """One request with its gold answer."""

    id: str
    input: str
    output: str


@dataclass(frozen=True)
class ArcQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices``."""

    id: str
    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    answer: int

    def as_example(self) -> Example:
        return Example(id=self.id, input=self.question, output=self.choices[self.answer])


def alpaca_input(row: dict) -> str:
    """What a user would type for an Alpaca row: the instruction, then its input if any."""
    instruction = str(row.get("instruction", "")).strip()
    extra = str(row.get("input", "") or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_DATA_BYTES:
            raise DataError(f"{path}: {size} bytes is over the {MAX_DATA_BYTES} byte limit for a data file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory — pass an Alpaca .json or an ARC .jsonl file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def load_alpaca(path: str | Path, split: str = "train", held_out: int = ALPACA_HELD_OUT) -> list[Example]:
    """Alpaca rows as examples; ``split`` is "train" (all but the last ``held_out``), "heldout" or "all"."""
    p = Path(path)
    try:
        rows = json.loads(_read_text(p))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: not valid JSON (line {exc.lineno}: {exc.msg}) — expected an Alpaca list of rows") from None
    if not isinstance(rows, list):
        raise DataError(f"{p}: expected a JSON list of {{instruction, input, output}} rows, got {type(rows).__name__}")
    out: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
            raise DataError(f"{p}: row {i}: expected an object with string 'instruction' and 'output'")
        out.append(Example(id=f"{p.stem}:{i}", input=alpaca_input(row), output=row["output"].strip()))
    if split == "all":
        return out
    if held_out >= len(out):
        raise DataError(f"{p}: {len(out)} rows cannot hold out {held_out} — pass a smaller held-out size")
    if split == "train":
        return out[: len(out) - held_out]
    if split == "heldout":
        return out[len(out) - held_out:]
    raise DataError(f"unknown split '{split}' — choose train, heldout or all")


def load_arc(path: str | Path) -> list[ArcQuestion]:
    """ARC questions from a JSONL file (``question``, ``choices.text``, ``choices.label``, ``answerKey``)."""
    p = Path(path)
    out: list[ArcQuestion] = []
    for n, line in enumerate(_read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = tuple(str(t) for t in row["choices"]["text"])
            labels = tuple(str(t) for t in row["choices"]["label"])
            question = str(row["question"])
            answer = labels.index(str(row["answerKey"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{p}: line {n}: not an ARC row ({type(exc).__name__}: {exc}) — expected question,"
                            " choices.text, choices.label and an answerKey among the labels") from None
        if len(choices) != len(labels) or len(choices) < 2:
            raise DataError(f"{p}: line {n}: choices.text and choices.label must be equal lists of 2 or more")
        out.append(ArcQuestion(id=f"{p.stem}:{row.get('id', n)}", question=question, choices=choices,
                               labels=labels, answer=answer))
    if not out:
        raise DataError(f"{p}: holds no ARC questions")
    return out


def load_examples(path: str | Path, split: str = "train") -> list[Example]:
    """Examples from an Alpaca .json (split as given) or an ARC .jsonl (correct choice as the answer)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [q.as_example() for q in load_arc(p)]
    return load_alpaca(p, split)
