"""LoRA fine-tuning of each stage on the shared base, exported straight to llama.cpp LoRA GGUFs.

Needs the optional ``[train]`` extra (torch==2.13.0, transformers, peft). Training text is
built by the runtime itself: each example is the stage's prompt rendered and tokenized by
llama.cpp exactly as ``edge-fslm run`` will see it, followed by the target and the end-of-turn
token, so there is no train/serve mismatch in chat markup or tokenization. Examples are
packed into fixed-length rows with per-example position ids and an explicit block-diagonal
causal mask, so packed examples never attend to each other. Loss is on target
tokens only. Every ``save_every`` steps the adapter, optimizer and data order are saved, so
a killed run resumes from the last checkpoint; a finished stage is skipped on a re-run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import gguf_info, sources
from ..units import fmt_bytes
from ..jsonl import folder_lock, read_records
from .distill import STAGE_ROW_KEYS
from ..errors import DataError, EdgeFSLMError
from ..manifest import Manifest, StageSpec, load_stack

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Log = Callable[[str], None]


class TrainExtraMissing(EdgeFSLMError):
    """torch / transformers / peft are not installed."""


@dataclass(frozen=True)
class TrainConfig:
    """LoRA hyper-parameters; the defaults suit a 2-core CPU (short packed rows, few steps)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    lr: float = 4e-4
    warmup: int = 5
    batch_size: int = 4  # packed rows per step
    seq_len: int = 256  # tokens per packed row
    steps: int = 60
    seed: int = 0
    save_every: int = 10
    threads: int | None = None
    # Packed examples must not see each other. transformers resets positions per example but, with
    # sdpa and no mask, still lets a packed example attend to the ones before it in the row; an
    # explicit block-diagonal causal mask stops that. False reproduces adapters trained without it.
    block_diagonal: bool = True

    def with_overrides(self, **kw: object) -> "TrainConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        bad = sorted(set(kw) - set(self.__dataclass_fields__))
        if bad:
            raise DataError(f"unknown training setting {bad[0]!r} — known: {', '.join(self.__dataclass_fields__)}")
        if "targets" in kw:
            kw["targets"] = tuple(kw["targets"])  # type: ignore[arg-type]
        return replace(self, **kw)  # type: ignore[arg-type]


@dataclass
class StageResult:
    """What training one stage cost and produced."""

    stage: str
    adapter: Path
    examples: int
    skipped_too_long: int
    skipped_empty: int
    steps: int
    target_tokens: int  # tokens the loss was computed on
    tokens: int  # all non-padding tokens seen
    seconds: float
    first_loss: float
    last_loss: float
    resumed_from: int = 0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["adapter"] = str(self.adapter)
        return d


def require_train_extra() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TrainExtraMissing(
            f"fine-tuning needs the [train] extra ({exc.name} is missing) — pip install 'edge-fslm[train]'"
            " (it pins torch==2.13.0, the CPU build)"
        ) from None


# --------------------------------------------------------------------------- the base


def _quiet_transformers() -> None:
    """Our own log lines say what is happening; transformers' progress bars and warnings would bury them."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def hf_base(gguf_path: Path, cache_dir: Path | None = None, log: Log | None = None) -> Path:
    """A float HF checkpoint of a GGUF base, dequantized by transformers once and cached by sha256.

    LoRA trains on exactly the weights llama.cpp will run (the dequantized GGUF), and the
    converter needs an HF checkpoint to map the adapter's tensors.
    """
    require_train_extra()
    digest = sources.sha256_file(gguf_path)
    root = cache_dir or Path(os.environ.get("EDGE_FSLM_CACHE", Path.home() / ".cache" / "edge-fslm")) / "hf-base"
    out = root / digest[:16]
    if (out / "config.json").is_file():
        return out
    if log:
        log(f"dequantizing {gguf_path.name} into a float HF checkpoint (once; cached in {out})")
    from edge_fslm.convert.gguf_to_hf import dequantize_to_hf

    _quiet_transformers()
    return dequantize_to_hf(gguf_path, out, tokenizer=False)


# --------------------------------------------------------------------------- data


@dataclass
class Encoded:
    """One training example: prompt tokens (no loss) then target tokens (loss)."""

    prompt: list[int]
    target: list[int]


def encode_stage_rows(lm, stage: StageSpec, rows: list[dict], seq_len: int) -> tuple[list[Encoded], int, int]:
    """Tokenize rows the way the runtime will: rendered prompt + target + end-of-turn, cut to ``seq_len``.

    Returns (examples, skipped because the prompt alone fills the row, skipped for an empty target).
    """
    from ..stage import prepare

    eos = lm.llm.token_eos()
    out: list[Encoded] = []
    too_long = empty = 0
    for r in rows:
        target_text = r["output"].strip()
        if not target_text:
            empty += 1
            continue
        values = {k: v for k, v in r["values"].items() if k in stage.reads}
        missing = [k for k in stage.reads if k not in values]
        if missing:
            raise DataError(f"stage '{stage.name}' reads {{{missing[0]}}}, which the training rows do not have"
                            " — distill with a stack whose stages come before it")
        prompt, _ = prepare(lm, stage, values, 1 << 20)
        target = lm.llm.tokenize(target_text.encode("utf-8"), add_bos=False, special=False)
        target = target[: stage.max_tokens] + ([eos] if len(target) <= stage.max_tokens else [])
        if len(prompt) + 1 > seq_len - 8:
            too_long += 1
            continue
        out.append(Encoded(prompt=prompt, target=target[: seq_len - len(prompt)]))
    return out, too_long, empty


def packed_mask(position_ids):
    """A (batch, 1, L, L) boolean causal mask that keeps each packed example to itself.

    Examples are told apart by their positions restarting at 0 (padding is its own block).
    """
    import torch

    seg = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    n = position_ids.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def pack(examples: list[Encoded], seq_len: int, pad_id: int, seed: int, epoch: int):
    """Shuffle (deterministically per epoch) and pack examples first-fit into rows of ``seq_len``.

    Returns (input_ids, labels, position_ids, real tokens) rows; padding is its own
    "sequence" with label -100.
    """
    order = list(range(len(examples)))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    rows: list[tuple[list[int], list[int], list[int], int]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []

    def flush() -> None:
        nonlocal ids, labels, pos
        if ids:
            n = seq_len - len(ids)
            rows.append((ids + [pad_id] * n, labels + [-100] * n, pos + list(range(n)), len(ids)))
        ids, labels, pos = [], [], []

    for i in order:
        ex = examples[i]
        toks = ex.prompt + ex.target
        if len(ids) + len(toks) > seq_len:
            flush()
        ids += toks
        labels += [-100] * len(ex.prompt) + ex.target
        pos += list(range(len(toks)))
    flush()
    return rows


# --------------------------------------------------------------------------- training


def _save_checkpoint(ckpt: Path, model, optimizer, scheduler, state: dict) -> None:
    import torch

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **state}, tmp / "trainer_state.pt")
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log's lines up to the checkpoint's step (jsonl.py's rules: a torn last line is cut)."""
    if not path.is_file():
        return
    keep = [r for r in read_records(path, ("step", "loss"), "training log") if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)


def train_stage(
    stage: StageSpec,
    rows: list[dict],
    lm,
    base_hf: Path,
    base_gguf: Path,
    out_dir: Path,
    config: TrainConfig,
    *,
    log: Log | None = None,
) -> StageResult:
    """Train one stage's adapter (resuming a checkpoint if there is one) and export it to GGUF."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_fslm.convert import convert_lora

    say = log or (lambda s: None)
    work = out_dir / stage.name
    work.mkdir(parents=True, exist_ok=True)
    result_file = work / "result.json"
    gguf_out = out_dir / f"{stage.name}.gguf"
    if result_file.is_file() and gguf_out.is_file():
        data = json.loads(result_file.read_text(encoding="utf-8"))
        if data.get("config") == json.loads(json.dumps(asdict(config))):
            say(f"[{stage.name}] already trained ({gguf_out.name}); skipping")
            data["adapter"] = Path(data["adapter"])
            return StageResult(**data)
        raise DataError(f"{work}: was trained with other settings — pass a new -o folder, or delete {work} to retrain")

    t0 = time.perf_counter()
    _quiet_transformers()
    if config.threads:
        torch.set_num_threads(config.threads)
    examples, too_long, empty = encode_stage_rows(lm, stage, rows, config.seq_len)
    if not examples:
        raise DataError(f"stage '{stage.name}': no usable training rows ({too_long} too long, {empty} empty)")
    pad_id = lm.llm.token_eos()
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model.config.use_cache = False
    ckpt = work / "checkpoint"
    state = {"step": 0, "epoch": 0, "row": 0, "losses": [], "tokens": 0, "target_tokens": 0, "seconds": 0.0}
    if (ckpt / "trainer_state.pt").is_file():
        model = PeftModel.from_pretrained(model, ckpt, is_trainable=True)
        saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        state = {k: saved[k] for k in state}
        torch.set_rng_state(saved["torch_rng"])
        say(f"[{stage.name}] resuming at step {state['step']}/{config.steps}")
    else:
        saved = None
        lcfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=list(config.targets), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    resumed_from = state["step"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 1.0 - 0.9 * frac

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    model.train()
    setup_seconds = time.perf_counter() - t0  # tokenizing, loading the base, restoring a checkpoint
    log_path = work / "train_log.jsonl"
    _truncate_log(log_path, state["step"])  # steps after the checkpoint are redone; keep one line per step
    rows_epoch = pack(examples, config.seq_len, pad_id, config.seed, state["epoch"])
    with open(log_path, "a", encoding="utf-8") as logf:
        while state["step"] < config.steps:
            t_step = time.perf_counter()
            batch = []
            while len(batch) < config.batch_size:
                if state["row"] >= len(rows_epoch):
                    state["epoch"] += 1
                    state["row"] = 0
                    rows_epoch = pack(examples, config.seq_len, pad_id, config.seed, state["epoch"])
                batch.append(rows_epoch[state["row"]])
                state["row"] += 1
            ids = torch.tensor([b[0] for b in batch])
            labels = torch.tensor([b[1] for b in batch])
            pos = torch.tensor([b[2] for b in batch])
            mask = packed_mask(pos) if config.block_diagonal else None
            out = model(input_ids=ids, position_ids=pos, attention_mask=mask, labels=labels)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            loss = float(out.loss.detach())
            state["losses"].append(loss)
            n_target = int((labels != -100).sum())
            state["target_tokens"] += n_target
            state["tokens"] += sum(b[3] for b in batch)
            state["seconds"] += time.perf_counter() - t_step
            rec = {"step": state["step"], "loss": round(loss, 4), "lr": scheduler.get_last_lr()[0],
                   "epoch": state["epoch"], "target_tokens": n_target, "seconds": round(time.perf_counter() - t_step, 2)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            say(f"[{stage.name}] step {state['step']}/{config.steps} loss {loss:.3f} ({rec['seconds']:.1f} s)")
            if state["step"] % config.save_every == 0 or state["step"] == config.steps:
                _save_checkpoint(ckpt, model, optimizer, scheduler, state)

    peft_dir = work / "peft"
    shutil.rmtree(peft_dir, ignore_errors=True)
    model.save_pretrained(peft_dir)
    convert_lora(peft_dir, base_hf, gguf_out, "f16", base_gguf=base_gguf)
    gguf_info.validate_adapter(gguf_out, gguf_info.validate_model(base_gguf))
    losses = state["losses"]
    result = StageResult(
        stage=stage.name, adapter=gguf_out, examples=len(examples), skipped_too_long=too_long,
        skipped_empty=empty, steps=state["step"], target_tokens=state["target_tokens"], tokens=state["tokens"],
        seconds=round(state["seconds"] + setup_seconds, 1),  # every step's wall time (across resumes) + this run's setup
        first_loss=round(sum(losses[:5]) / max(1, len(losses[:5])), 4),
        last_loss=round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4),
        resumed_from=resumed_from, config=asdict(config),
    )
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, result_file)
    say(f"[{stage.name}] wrote {gguf_out} ({fmt_bytes(gguf_out.stat().st_size, 1)}), loss {result.first_loss} → {result.last_loss}")
    return result


def finetune(
    stack: str | Path | Manifest,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    config: TrainConfig = TrainConfig(),
    stage_configs: dict[str, dict] | None = None,
    stages: list[str] | None = None,
    base_hf: str | Path | None = None,
    log: Log | None = None,
) -> list[StageResult]:
    """Train one adapter per stage of ``stack`` from ``data_dir/<stage>.jsonl`` (see :mod:`distill`).

    Every stage must run on the same base model (the shared-base layout); adapters are
    written as ``out_dir/<stage>.gguf``. ``stage_configs`` overrides settings per stage.
    """
    require_train_extra()
    from ..api import Stack

    manifest = stack if isinstance(stack, Manifest) else load_stack(stack)
    bases = {s.model for s in manifest.stages}
    if len(bases) != 1:
        raise DataError(f"{manifest.name}: stages use {len(bases)} models; fine-tuning trains adapters on one shared base")
    bare = replace(manifest, stages=tuple(replace(s, adapter=None) for s in manifest.stages))
    data = Path(data_dir).expanduser()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    wanted = stages or [s.name for s in manifest.stages]
    unknown = [n for n in wanted if n not in {s.name for s in manifest.stages}]
    if unknown:
        raise DataError(f"stage {unknown[0]!r}: {manifest.name} has no such stage — stages: "
                        + ", ".join(s.name for s in manifest.stages))
    for name in wanted:
        if not (data / f"{name}.jsonl").is_file():
            raise DataError(f"{data / (name + '.jsonl')}: missing — run `edge-fslm distill` into {data} first")
    results: list[StageResult] = []
    with folder_lock(out, "finetune"), Stack.load(bare, measure_rss=False, ctx_size=max(2048, config.seq_len * 2)) as st:
        model = next(iter(st.pipeline.models.values()))
        lm = st.pipeline.pool.get(model)
        hf = Path(base_hf) if base_hf else hf_base(model.path, log=log)
        for name in wanted:
            cfg = config.with_overrides(**(stage_configs or {}).get(name, {}))
            rows = read_records(data / f"{name}.jsonl", STAGE_ROW_KEYS, "training rows")
            results.append(train_stage(manifest.stage(name), rows, lm, hf, model.path, out, cfg, log=log))
    return results
