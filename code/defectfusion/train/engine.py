"""The training loop both phases share, in the parts detr's engine has:

- ``fit``: set up (accelerator, loader, optimiser, schedule, EMA), resume or start, then per
  epoch train, evaluate, select, checkpoint; read it top to bottom;
- ``train_one_epoch``: forward, backward, clip, step, EMA, one log row per step;
- ``evaluate_epoch`` and ``Progress.select``: val metrics, and whether they are the best yet
  (epoch 0, the starting model, is evaluated and logged but never selected);
- ``RunFolder``: checkpoint and resume: ``last.pt`` (everything needed to resume), ``best.pt``
  (the weights that scored best on val) and the weights kept at fixed epochs, atomically;
- ``Logger``: ``history.jsonl`` (one row per epoch), ``steps.jsonl``, ``experiment_log.txt``.

Training stops early when the selection metric has not improved for ``patience`` epochs.

Determinism and resume: at the start of epoch e every random generator is reseeded
from (seed, e), so the data order, the augmentations and DEIMv2's denoising noise of
an epoch do not depend on what ran before it. A run killed mid-epoch and resumed from
``last.pt`` (written at the end of the previous epoch) therefore replays that epoch
exactly and ends with the same weights and metrics as an uninterrupted run (on CPU).
Schedules are counted in steps, never in minutes.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from defectfusion.config import Config, TrainSection, safe_name
from defectfusion.core.environment import git_commit
from defectfusion.core.errors import UserError, is_int
from defectfusion.core.fsutil import atomic_write_text
from defectfusion.core.jsonio import load_json, parse_json
from defectfusion.model.checkpoint import (
    check_meta,
    check_state,
    load_checkpoint,
    save_checkpoint,
    state_problem,
)
from defectfusion.train.schedule import ema_decay_at, lr_lambda, plateau_gain


@dataclass
class Job:
    """What a phase hands the engine."""

    phase: str  # "phase1" | "phase2"
    model: nn.Module
    param_groups: list[dict[str, Any]]
    cfg: Config
    train: TrainSection
    meta: dict[str, Any]  # stored in every checkpoint (preset, class names, ...)
    out: Path
    train_json: Path
    val_json: Path
    set_mode: Callable[[nn.Module, bool], None]  # train/eval, keeping frozen parts frozen
    evaluate: Callable[[nn.Module], dict[str, Any]]  # val metrics of a model
    step_extras: Callable[[nn.Module], dict[str, float]] | None = None  # per-step log (alpha ...)
    epoch_extras: Callable[[nn.Module], dict[str, float]] | None = None
    eval_before_training: bool = False  # Phase 2 logs epoch 0 (before any update)
    # Eval weights kept at fixed epochs (epochK.pt) and at the last epoch run (final.pt), and
    # val predictions of epochs 0, 1 and the last: the post-mortem's drift needs them.
    keep_epochs: tuple[int, ...] = ()
    keep_final: bool = False
    save_val_predictions: bool = False
    notes: list[str] = field(default_factory=list)  # lines for experiment_log.txt's header
    # Per-process batch -> train loader, in place of the default one (Phase 2: its view pool,
    # or its cached features, defectfusion.model.cache); it must use a SeededSampler.
    train_loader: Callable[[int], Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def make_ema(model: nn.Module, decay: float, warmup_steps: int) -> AveragedModel:
    """An EMA of ``model`` (parameters and buffers) with DEIMv2's decay ramp.

    torch's ``AveragedModel`` copies the weights on its first update and then calls this
    with ``num_averaged`` = updates so far; DEIMv2 counts the first update as t = 1, so the
    t-th update blends with ``ema_decay_at(t)``.
    """

    @torch.no_grad()
    def avg(ema_params: list, params: list, num_averaged: torch.Tensor) -> None:
        if not ema_params[0].is_floating_point():
            return  # integer buffers (BatchNorm's num_batches_tracked): DEIMv2 leaves them
        d = ema_decay_at(int(num_averaged) + 1, decay, warmup_steps)
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return AveragedModel(model, multi_avg_fn=avg, use_buffers=True)


_SUFFIX = re.compile(r"_(aux|dn)_\d+$")


def loss_terms(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum each loss term over its auxiliary and denoising copies (loss_mal_aux_2 -> loss_mal)."""
    out: dict[str, float] = defaultdict(float)
    for k, v in loss_dict.items():
        out[_SUFFIX.sub("", k)] += float(v.detach())
    return dict(out)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []

    return [parse_json(line, path) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


class Logger:
    """history.jsonl (one row per epoch), steps.jsonl (one per step), experiment_log.txt."""

    def __init__(
        self, out: Path, resume_epoch: int | None, resume_step: int | None, enabled: bool = True
    ):
        self.enabled = enabled  # only the main process writes (DDP)
        self.history_path = out / "history.jsonl"
        self.steps_path = out / "steps.jsonl"
        self.text_path = out / "experiment_log.txt"
        # On resume, forget what was logged after the checkpoint (it will be replayed).
        self.history = [
            r
            for r in _read_jsonl(self.history_path)
            if resume_epoch is not None and r["epoch"] <= resume_epoch
        ]
        self.steps = [
            r
            for r in _read_jsonl(self.steps_path)
            if resume_step is not None and r["step"] <= resume_step
        ]
        self.echo = enabled  # experiment_log lines also go to stdout (Snakemake's log)

    def line(self, msg: str) -> None:
        """Append one line to experiment_log.txt (appended, never replaced: `tail -f` follows
        it, and an earlier run's lines stay above the new run's header)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.enabled:
            with open(self.text_path, "a", encoding="utf-8") as f:
                f.write(f"[{stamp}] {msg}\n")
        if self.echo:
            print(msg, flush=True)

    def step(self, row: dict[str, Any]) -> None:
        self.steps.append(row)

    def epoch(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.enabled:
            _write_jsonl(self.history_path, self.history)
            _write_jsonl(self.steps_path, self.steps)
            atomic_write_text(self.history_path.with_suffix(".csv"), history_csv(self.history))


PLOT_COLUMNS = ("epoch", "step", "lr", "loss", "val_map", "val_map50", "val_critical_recall",
                "val_composite")  # fmt: skip


def history_csv(history: list[dict[str, Any]]) -> str:
    """The per-epoch numbers as CSV, a format `dvc plots` draws (it rejects .jsonl)."""
    lines = [",".join(PLOT_COLUMNS)]
    for r in history:
        lines.append(",".join("" if r.get(c) is None else repr(r.get(c)) for c in PLOT_COLUMNS))
    return "\n".join(lines) + "\n"


def run_hash(job: Job) -> str:
    """Identifies a run: its config and starting point, so --resume never mixes two runs."""
    import hashlib

    ident = {
        "phase": job.phase,
        "config": job.cfg.to_dict(),
        "start": job.meta.get("phase1_checkpoint"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_one_epoch(
    job: Job,
    accelerator: Accelerator,
    model: nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    ema: AveragedModel | None,
    log: Logger,
    epoch: int,
    step: int,
) -> tuple[int, dict[str, float], float]:
    """One pass over `loader`: forward, backward, clip, step, EMA, one log row per step.

    Returns the global step after the epoch, the epoch's mean loss terms and its seconds.
    """
    tc = job.train
    raw = accelerator.unwrap_model(model)
    t0 = time.time()
    sums: dict[str, float] = defaultdict(float)
    bar = tqdm(
        loader,
        desc=f"{job.phase} epoch {epoch}/{tc.epochs}",
        leave=False,
        # None: off when stderr is not a terminal (a Snakemake log gets the epoch lines,
        # not carriage-return bar frames)
        disable=None if accelerator.is_main_process else True,
    )
    for pixel_values, targets in bar:
        labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in targets]
        with accelerator.autocast():
            output = model(pixel_values=pixel_values, labels=labels)
        accelerator.backward(output.loss)
        if tc.clip_grad > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(raw)
        step += 1
        terms = loss_terms(output.loss_dict)
        loss = float(output.loss.detach())
        if accelerator.num_processes > 1:  # log the mean over processes, not rank 0's share
            names = sorted(terms)
            vals = accelerator.reduce(torch.tensor([loss, *(terms[k] for k in names)]), "mean")
            loss, terms = float(vals[0]), dict(zip(names, vals[1:].tolist(), strict=True))
        for k, v in terms.items():
            sums[k] += v
        sums["loss"] += loss
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0]}
        if job.step_extras:
            row.update(job.step_extras(raw))
        log.step(row)
        bar.set_postfix(loss=f"{loss:.2f}")
    seconds = time.time() - t0
    n = max(1, len(loader))
    mean = {("train_" + k if not k.startswith("loss") else k): v / n for k, v in sums.items()}
    return step, mean, seconds


def fit(job: Job, resume: bool = False, restart: bool = False) -> dict[str, Any]:
    """Train `job` (see the module docstring); returns the best score and epochs run.

    ``resume`` continues the run in ``job.out`` when it is this run (same config and start);
    a new run never replaces an earlier run's ``best.pt`` unless ``restart`` says so.
    """
    try:
        return _fit(job, resume, restart)
    finally:
        if not torch.cuda.is_available():
            torch.set_flush_denormal(False)  # process-wide state: give it back


def check_selectable(val_json: Path, select: str, critical: list[int]) -> None:
    """The val split can score the selection metric: it has boxes, and of a critical class
    when the metric reads critical recall (an undefined score used to end in a TypeError
    after the first epoch's training)."""
    from defectfusion.data.validate import check_loadable  # deferred: loads PIL

    data = load_json(val_json)
    check_loadable(data, val_json)  # a malformed split: the loader's one line, first
    anns = data["annotations"]
    if not anns:
        raise UserError(
            f"{val_json}: no boxes in the val split, so no epoch can be scored or selected; "
            "add labelled images to val"
        )
    if select in ("critical_recall", "composite") and not any(
        a["category_id"] in critical for a in anns
    ):
        raise UserError(
            f"{val_json}: no box of a critical class {sorted(critical)} in val, so "
            f"select_metric={select} is undefined; choose select_metric=map or label them"
        )


def _fit(job: Job, resume: bool = False, restart: bool = False) -> dict[str, Any]:
    out = job.out
    tc = job.train
    check_selectable(job.val_json, tc.select_metric, list(job.cfg.data.critical_classes))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if (cuda and tc.amp) else "no",
        # Not every parameter meets every loss term (e.g. denoising embeddings without labels).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if not cuda:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Tiny gradients decay into subnormal floats, which x86 CPUs compute ~100x slower.
        torch.set_flush_denormal(True)
    seed_everything(job.cfg.seed)

    from defectfusion.data.loader import AugmentConfig, make_loader  # deferred: loads PIL

    # train.batch_size is the global batch. Accelerate deals whole loader batches to the
    # processes in turn, so with a per-process batch of B/n the n processes of one step see
    # exactly the images of one single-process batch (its split_batches is ignored on CPU).
    if tc.batch_size % accelerator.num_processes:
        raise UserError(
            f"{job.phase}.batch_size={tc.batch_size} must be divisible by the "
            f"{accelerator.num_processes} training processes"
        )
    per_process_batch = tc.batch_size // accelerator.num_processes
    loader = (
        job.train_loader(per_process_batch)
        if job.train_loader
        else make_loader(
            job.train_json,
            job.cfg.data.image_size,
            per_process_batch,
            train=True,
            augment=AugmentConfig.from_config(job.cfg.data.augment),
            num_workers=job.cfg.data.num_workers,
            seed=job.cfg.seed,
            normalize=job.cfg.data.normalize,
        )
    )
    optimizer = torch.optim.AdamW(job.param_groups, lr=tc.lr, weight_decay=tc.weight_decay)
    ema = make_ema(job.model, tc.ema_decay, tc.ema_warmup_steps) if tc.ema_decay > 0 else None
    sampler = loader.sampler  # SeededSampler: its generator draws the order and augmentations
    model, optimizer, loader = accelerator.prepare(job.model, optimizer, loader)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, tc))
    raw = accelerator.unwrap_model(model)

    folder = RunFolder(job, accelerator)
    job.meta["run_hash"] = run_hash(job)
    ckpt, stale = folder.previous(resume, restart)
    if ckpt is not None:
        progress = folder.restore(ckpt, raw, optimizer, scheduler, ema)
        log = Logger(out, progress.epoch, progress.step, accelerator.is_main_process)
        log.line(f"resumed from {folder.last} at epoch {progress.epoch} (step {progress.step})")
        restored = [n for n in folder.kept if (out / n).exists()]
        if restored:
            log.line(f"weights kept in {folder.last.name}: {', '.join(sorted(restored))}")
        if ckpt.get("finished"):
            return {"best": progress.best, "epochs": progress.epoch, "resumed": True}
    else:
        progress = Progress()
        log = Logger(out, None, None, accelerator.is_main_process)
        log.line(f"{job.phase}: {job.meta.get('preset')} on {job.train_json} (val {job.val_json})")
        log.line(f"code commit: {git_commit() or 'unknown (not a git checkout)'}")
        if stale:
            log.line(f"not resuming {folder.last}: {stale} (a new run starts)")
        for note in job.notes:
            log.line(note)
        # The whole config in a file of its own (a 2,800-character log line helped no one).
        atomic_write_text(
            out / RUN_CONFIG, yaml.safe_dump(job.cfg.to_dict(), sort_keys=True, allow_unicode=True)
        )
        log.line(f"config: {out / RUN_CONFIG}")
        log.line(
            f"{steps_per_epoch} steps/epoch, {total_steps} steps at most, device {accelerator.device}"
        )
    eval_model = ema.module if ema is not None else raw  # the weights evaluated and kept

    def save(finished: bool = False) -> None:
        folder.save(progress, raw, optimizer, scheduler, ema, log, finished)

    select = tc.select_metric
    if job.eval_before_training and progress.epoch == 0:
        metrics = evaluate_epoch(job, folder, raw, eval_model, 0)
        row = {"epoch": 0, "step": 0, "seconds": 0.0, "lr": 0.0, **_metric_row(metrics)}
        if job.epoch_extras:
            row.update(job.epoch_extras(raw))
        log.epoch(row)
        # Logged, never selected: epoch 0 is the starting model itself, and letting it compete
        # would report a steadily falling run as identical to its start (a CI of [0, 0]).
        log.line(f"epoch 0 (before any update, not selectable): {_summary(metrics)}")

    # Phase 1 may hold the minimum lr beyond its schedule until its plateau is met
    # (phase1.max_epochs; `plateau_stop`): the schedule's length stays `epochs`.
    last = max(tc.epochs, tc.max_epochs)
    first_epoch, started = progress.epoch + 1, time.monotonic()
    for epoch in range(first_epoch, last + 1):
        es = epoch_seed(job.cfg.seed, epoch)
        seed_everything(es)
        # The sampler's generator, not the (prepared) loader's: that one only seeds workers.
        sampler.generator.manual_seed(es)
        job.set_mode(raw, True)
        progress.step, train_row, seconds = train_one_epoch(
            job, accelerator, model, loader, optimizer, scheduler, ema, log, epoch, progress.step
        )
        progress.epoch = epoch
        if epoch % tc.eval_every and epoch < tc.epochs:
            save()
            continue
        metrics = evaluate_epoch(job, folder, raw, eval_model, epoch)
        improved = progress.select(metrics[select])
        if improved:
            folder.save_best(epoch, metrics, eval_model, raw)
        row = {
            "epoch": epoch,
            "step": progress.step,
            "seconds": round(seconds, 3),
            "lr": scheduler.get_last_lr()[0],
            **train_row,
            **_metric_row(metrics),
        }
        if job.epoch_extras:
            row.update(job.epoch_extras(raw))
        row["best"] = improved
        log.epoch(row)
        left = max(0, tc.epochs - epoch)  # the schedule's epochs; an extension is open-ended
        log.line(
            f"epoch {epoch}/{tc.epochs if epoch <= tc.epochs else f'{last} at most'}: "
            f"loss {row['loss']:.3f}  {_summary(metrics)}  "
            f"best {select} {progress.best:.4f}{' (new)' if improved else ''}  ({seconds:.1f}s"
            f"{time_left(time.monotonic() - started, epoch - first_epoch + 1, left)})"
        )
        stop = tc.patience > 0 and progress.bad_epochs >= tc.patience
        plateaued = epoch >= tc.epochs and last > tc.epochs and plateau_stop(log.history, tc)
        save(finished=stop or plateaued or epoch == last)
        if stop:
            log.line(f"early stop: {select} did not improve for {tc.patience} epochs")
            break
        if plateaued:
            log.line(f"plateau met at epoch {epoch}: the minimum-lr stretch stops here")
            break
    log.line(f"done: best val {select} = {progress.best:.4f}")
    if job.phase == "phase1" and tc.plateau_fraction > 0:
        p = plateau_gain(log.history, tc.plateau_fraction)
        if p["gain"] is not None:
            met = "reached" if p["gain"] < tc.plateau_min_gain else "NOT reached"
            log.line(
                f"plateau {met}: val mAP gained {p['gain']:+.4f} from epoch {p['from_epoch']} "
                f"to {p['to_epoch']} (plateau: less than {tc.plateau_min_gain})"
            )
    return {"best": progress.best, "epochs": progress.epoch}


def plateau_stop(history: list[dict[str, Any]], tc: Any) -> bool:
    """Whether Phase 1 may stop now: its val mAP gained less than ``plateau_min_gain`` over
    the last ``plateau_fraction`` of the epochs run (`plateau_gain`, the criterion the log and
    the book report), checked from the end of the schedule on, up to ``max_epochs``."""
    if tc.plateau_fraction <= 0:
        return False
    gain = plateau_gain(history, tc.plateau_fraction)["gain"]
    return gain is not None and gain < tc.plateau_min_gain


def time_left(elapsed: float, done: int, left: int) -> str:
    """``", about 12 min left"``: the mean epoch time of this session (evaluation included)
    times the epochs left; empty when none are."""
    if left <= 0 or done <= 0:
        return ""
    s = elapsed / done * left
    return f", about {s / 60:.0f} min left" if s >= 90 else f", about {s:.0f} s left"


# ---- evaluate and select ---------------------------------------------------------------------


def evaluate_epoch(
    job: Job, folder: RunFolder, raw: nn.Module, eval_model: nn.Module, epoch: int
) -> dict[str, Any]:
    """Val metrics of the eval weights after `epoch` (0: before any update), and the records
    kept at fixed epochs (`Job.keep_epochs`, `keep_final`, `save_val_predictions`)."""
    job.set_mode(raw, False)
    metrics = job.evaluate(eval_model)
    folder.record(epoch, metrics, eval_model)
    return metrics


@dataclass
class Progress:
    """Where a run stands: what last.pt keeps besides the weights and optimiser."""

    epoch: int = 0  # the last epoch completed
    step: int = 0
    best: float = -math.inf  # the best val score of the selection metric so far
    bad_epochs: int = 0  # evaluated epochs since it last improved (early stopping)

    def select(self, score: float) -> bool:
        """Whether `score` beats the best so far (then it is the new best)."""
        if score > self.best:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False


# ---- checkpoint and resume -------------------------------------------------------------------

RUN_CONFIG = "run_config.yaml"  # the run's whole config, beside experiment_log.txt


def _unfit(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: cannot resume: {why}; the file is damaged or from another version: pass "
        "--restart to train this run from the start"
    )


class RunFolder:
    """The files of one run in ``job.out``: last.pt (everything a resume needs), best.pt, and
    the weights and val predictions kept at fixed epochs. Every write is atomic and made by
    the main process only; the kept weights are also stored in last.pt, so a runner that
    removed them before resuming an interrupted run gets them back."""

    def __init__(self, job: Job, accelerator: Accelerator) -> None:
        self.job, self.out = job, job.out
        self.main = accelerator.is_main_process
        self.last, self.best = self.out / "last.pt", self.out / "best.pt"
        self.kept: dict[str, dict[str, Any]] = {}

    def previous(self, resume: bool, restart: bool) -> tuple[dict[str, Any] | None, str | None]:
        """The checkpoint to resume from (None: a new run) and why last.pt is not resumed."""
        ckpt, stale = None, None
        if resume and self.last.exists():
            ckpt = load_checkpoint(self.last)
            if ckpt["meta"].get("run_hash") != self.job.meta["run_hash"]:
                # The config (or the starting checkpoint) changed since: not this run.
                stale = f"made with another config (run {ckpt['meta'].get('run_hash')})"
                ckpt = None
            elif ckpt.get("finished") and not self.best.exists():
                # A runner (Snakemake, DVC) removes best.pt before it reruns a finished run,
                # say after a code change: train again rather than return without a best.pt.
                stale, ckpt = "finished, best.pt removed", None
        if ckpt is None and self.best.exists() and not restart:
            # Starting over would replace weights an earlier run selected (a runner that
            # reruns a job, Snakemake or DVC, removes best.pt first: this is a person's).
            why = stale or "a new run was asked for (no --resume)"
            raise UserError(
                f"{self.out}: holds an earlier run's {self.best.name} and {why}; pass --restart "
                "to replace that run, or choose another --out"
            )
        return ckpt, stale

    def restore(
        self,
        ckpt: dict[str, Any],
        raw: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ema: AveragedModel | None,
    ) -> Progress:
        """Load last.pt's state into the run, and write back any kept file that is missing.

        Everything is checked before a file is written or a weight replaced: the kept weights
        as any checkpoint is (`check_meta`, `check_state`), the model's tensors against this
        run's shapes, and the counters' types. A last.pt that does not fit is one line that
        says to start over, never a traceback half-way through the restore.
        """
        last = self.last
        kept = ckpt.get("kept") or {}
        if not isinstance(kept, dict):
            raise _unfit(last, "its kept weights are not a mapping")
        for name, entry in kept.items():
            if not safe_name(name) or not name.endswith(".pt"):
                raise _unfit(last, f"it keeps weights under the name {name!r}")
            if not isinstance(entry, dict):
                raise _unfit(last, f"its kept {name} is not a checkpoint")
            check_meta(last, entry.get("meta"))
            check_state(last, entry.get("model"), entry["meta"])
        counters = [ckpt.get(k) for k in ("epoch", "step", "bad_epochs")]
        if not all(is_int(v) and v >= 0 for v in counters):
            raise _unfit(last, f"epoch, step and bad_epochs {counters} are not counts")
        best = ckpt.get("best", "missing")  # -inf before any epoch was scored; never NaN
        if best is not None and not (is_int(best) or isinstance(best, float) and best == best):
            raise _unfit(last, f"best {best!r} is not a number")
        problem = state_problem(raw, ckpt["model"])  # shapes and keys, before any loading
        if problem:
            raise _unfit(last, problem)
        try:  # the optimiser's state first: it does not read the model's weights
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ema is not None and "ema" in ckpt:
                ema.load_state_dict(ckpt["ema"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _unfit(
                last, f"its optimiser state does not fit ({e.__class__.__name__})"
            ) from None
        raw.load_state_dict(ckpt["model"])  # it fits (state_problem above)
        self.kept = kept
        for name, entry in kept.items():
            if not (self.out / name).exists():
                save_checkpoint(self.out / name, entry["model"], entry["meta"])
        return Progress(ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["bad_epochs"])

    def save(
        self,
        progress: Progress,
        raw: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ema: AveragedModel | None,
        log: Logger,
        finished: bool = False,
    ) -> None:
        """last.pt at the end of `progress.epoch`."""
        if not self.main:
            return
        # Steps up to here must be on disk: a resume from this checkpoint keeps only those.
        _write_jsonl(log.steps_path, log.steps)
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": progress.epoch,
            "step": progress.step,
            "best": progress.best,
            "bad_epochs": progress.bad_epochs,
            "finished": finished,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(self.last, raw.state_dict(), self.job.meta, kept=self.kept, **state)

    def keep(self, name: str, model: nn.Module, meta: dict[str, Any]) -> None:
        """Write OUT/name and remember a copy for last.pt."""
        if not self.main:
            return
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.kept[name] = {"model": weights, "meta": meta}
        save_checkpoint(self.out / name, weights, meta)

    def keep_eval_weights(
        self, name: str, epoch: int, metrics: dict[str, Any], eval_model: nn.Module
    ) -> None:
        meta = {**self.job.meta, "epoch": epoch, "val": _metric_row(metrics)}
        self.keep(name, eval_model, meta)

    def save_best(
        self, epoch: int, metrics: dict[str, Any], eval_model: nn.Module, raw: nn.Module
    ) -> None:
        self.keep_eval_weights(self.best.name, epoch, metrics, eval_model)
        if self.job.phase == "phase1":
            # The raw weights of the same epoch: Phase 2 may start from them instead of the
            # EMA (one of the post-mortem's candidate causes). Without EMA they are the same.
            meta = {**self.job.meta, "epoch": epoch, "val": _metric_row(metrics), "weights": "raw"}
            self.keep("best_raw.pt", raw, meta)

    def record(self, epoch: int, metrics: dict[str, Any], eval_model: nn.Module) -> None:
        """The fixed-epoch records the post-mortem reads (see Job.keep_epochs)."""
        preds = metrics.pop("predictions", None)
        if not self.main:
            return
        job = self.job
        if epoch in job.keep_epochs:
            self.keep_eval_weights(f"epoch{epoch}.pt", epoch, metrics, eval_model)
        if job.keep_final and epoch > 0:
            self.keep_eval_weights("final.pt", epoch, metrics, eval_model)
        if job.save_val_predictions and preds is not None:
            names = [f"val_epoch{epoch}"] if epoch in (0, 1) else []
            names += ["val_final"] if epoch > 0 else []
            for name in names:
                atomic_write_text(self.out / f"{name}.predictions.json", json.dumps(preds))


def _metric_row(m: dict[str, Any]) -> dict[str, Any]:
    keep = ("map", "map50", "map75", "critical_recall", "critical_recall50", "composite")
    row = {f"val_{k}": m[k] for k in keep if k in m}
    row["val_recall"] = {name: pc["recall"] for name, pc in m.get("per_class", {}).items()}
    row["val_ap"] = {name: pc["ap"] for name, pc in m.get("per_class", {}).items()}
    return row


def _summary(m: dict[str, Any]) -> str:
    return f"val mAP {m['map']:.4f}  mAP50 {m['map50']:.4f}  crit.recall {m['critical_recall']:.4f}  composite {m['composite']:.4f}"
