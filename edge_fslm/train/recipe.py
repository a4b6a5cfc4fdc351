"""A training recipe: the config file (plus seed) that reproduces a stack's adapters in one command.

``run_recipe`` distills the data with the teacher, fine-tunes every stage, and writes a
runnable stack folder (``OUT/stack.toml`` plus ``OUT/<stack>/<stage>.gguf``). Both steps
resume, so re-running the command after a kill continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from .distill import DistillReport, Progress, distill
from ..errors import DataError, ManifestError
from .finetune import StageResult, TrainConfig, finetune
from ..manifest import load_stack, load_toml

RECIPE_SUFFIX = ".recipe.toml"


@dataclass(frozen=True)
class DataSpec:
    file: str  # relative to --data-dir
    limit: int | None = None


@dataclass(frozen=True)
class Recipe:
    """The parsed recipe file."""

    path: str
    stack: str
    teacher_stack: str
    teacher: str
    seed: int
    data: tuple[DataSpec, ...]
    train: TrainConfig
    stage_train: dict[str, dict[str, Any]] = field(default_factory=dict)
    parallel: int = 1  # requests the teacher decodes together while distilling


def _builtin_recipe(name: str) -> tuple[str, str] | None:
    res = resources.files("edge_fslm.stacks") / f"{name}{RECIPE_SUFFIX}"
    return (res.read_text(encoding="utf-8"), f"<built-in recipe {name}>") if res.is_file() else None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in stack's recipe by stack name, or a recipe file."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_file():
        text, origin = p.read_text(encoding="utf-8"), str(p)
    else:
        found = _builtin_recipe(str(name_or_path))
        if found is None:
            raise ManifestError(f"'{name_or_path}' is neither a recipe file nor a built-in stack with a recipe")
        text, origin = found
    doc = load_toml(text, origin)
    r = doc.get("recipe")
    if not isinstance(r, dict):
        raise ManifestError(f"{origin}: needs a [recipe] table with stack, teacher_stack, teacher and [[recipe.data]]")
    for key in ("stack", "teacher_stack", "teacher"):
        if not isinstance(r.get(key), str):
            raise ManifestError(f"{origin}: recipe.{key}: expected a string")
    seed = r.get("seed", 0)
    if not isinstance(seed, int):
        raise ManifestError(f"{origin}: recipe.seed: expected an integer")
    parallel = r.get("parallel", 1)
    if not isinstance(parallel, int) or isinstance(parallel, bool) or not 1 <= parallel <= 64:
        raise ManifestError(f"{origin}: recipe.parallel: expected an integer from 1 to 64")
    data = []
    for i, d in enumerate(r.get("data", [])):
        if not isinstance(d, dict) or not isinstance(d.get("file"), str):
            raise ManifestError(f"{origin}: recipe.data[{i}].file: expected a file name relative to data_dir")
        limit = d.get("limit")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ManifestError(f"{origin}: recipe.data[{i}].limit: expected a positive integer")
        data.append(DataSpec(d["file"], limit))
    if not data:
        raise ManifestError(f"{origin}: recipe.data: list at least one data file")
    train = dict(doc.get("train", {}))
    stages = train.pop("stages", {})
    try:
        config = TrainConfig().with_overrides(**train, seed=seed)
        for st, over in stages.items():
            TrainConfig().with_overrides(**over)
    except (DataError, TypeError) as exc:
        raise ManifestError(f"{origin}: [train]: {exc}") from None
    return Recipe(path=origin, stack=r["stack"], teacher_stack=r["teacher_stack"], teacher=r["teacher"], seed=seed,
                  data=tuple(data), parallel=parallel, train=config, stage_train=dict(stages))


@dataclass
class RecipeReport:
    out_dir: Path
    distill: DistillReport
    stages: list[StageResult]
    seconds: float

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "distill": self.distill.to_dict(),
                "stages": [s.to_dict() for s in self.stages], "seconds": round(self.seconds, 1)}


def run_recipe(
    recipe: str | Path | Recipe,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> RecipeReport:
    """Distill, fine-tune and assemble a runnable stack folder in ``out_dir``."""
    t0 = time.perf_counter()
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    data_root = Path(data_dir).expanduser()
    files = []
    for d in rec.data:
        p = data_root / d.file
        if not p.is_file():
            raise DataError(f"{p}: recipe data file not found — pass the folder that holds it as data_dir")
        files.append((p, d.limit))
    out = Path(out_dir).expanduser()
    student = load_stack(rec.stack)
    if log:
        log(f"distilling {len(files)} data files with teacher {rec.teacher} into {out / 'data'}")
    dist = distill(rec.teacher_stack, files, rec.teacher, out / "data", threads=threads, parallel=rec.parallel,
                   progress=progress)
    stage_cfgs = {k: {**v, "threads": threads} for k, v in rec.stage_train.items()}
    config = rec.train.with_overrides(threads=threads)
    results = finetune(student, out / "data", out / student.name, config=config, stage_configs=stage_cfgs, log=log)
    # a runnable stack folder: the student's manifest beside its adapters
    text = (resources.files("edge_fslm.stacks") / f"{rec.stack}.toml").read_text(encoding="utf-8") \
        if student.builtin else Path(student.path).read_text(encoding="utf-8")  # type: ignore[arg-type]
    tmp = out / "stack.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "stack.toml")
    report = RecipeReport(out_dir=out, distill=dist, stages=results, seconds=time.perf_counter() - t0)
    (out / "recipe-report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report

