"""Knowledge distillation: fine-tune a student against a teacher's predictions.

The RMT-KD loss (the paper's Section II), with the usual temperature ``T``::

    L = α · task(student, y) + (1 − α) · T² · KL(p_teacher ‖ p_student)      p = softmax(logits / T)

``α = 1`` is plain fine-tuning (no teacher needed). Training data are batches as a
DataLoader yields them, the target last: ``(x, y)``, ``(x1, x2, y)``, or a dict of keyword
inputs with the target under ``"labels"``. Under ``torch.distributed`` (``torchrun``) the
student is wrapped in ``DistributedDataParallel`` and rank ``r`` of ``W`` takes batches
``r, r + W, …``; only rank 0 logs.

Example:
    >>> history = distill(student, teacher, train_loader, DistillConfig(alpha=0.5, epochs=2),
    ...                   val_data=val_loader)                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.calibrate import distributed_rank
from fxcompress.errors import ConfigError, DataError, TrainingError
from fxcompress.validate import check_fields, check_range, require_instance, require_reiterable

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How to fine-tune. ``alpha`` weighs the task loss against the teacher's KL term."""

    alpha: float = 0.5
    temperature: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_steps: int = 0
    clip_grad_norm: float | None = 1.0
    amp: bool = True  # bfloat16 autocast where the device supports it (CUDA); ignored on CPU
    log_every: int = 20
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        check_range(self, "alpha", 0, 1)
        check_range(self, "temperature", 0, open_low=True)
        check_range(self, "epochs", 1)
        check_range(self, "max_steps", 1)
        check_range(self, "lr", 0, open_low=True)
        check_range(self, "weight_decay", 0)
        check_range(self, "momentum", 0, 1, open_high=True)
        check_range(self, "warmup_steps", 0)
        check_range(self, "clip_grad_norm", 0, open_low=True)
        check_range(self, "log_every", 1)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"DistillConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"DistillConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


# -- batches and outputs ---------------------------------------------------------------------
def split_batch(batch: Any) -> tuple[tuple, dict, Any]:
    """A training batch as ``(args, kwargs, target)``: the target is last, or ``"labels"``."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise DataError(f"a dict batch needs its target under 'labels'; it has {sorted(batch)}")
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return (), kwargs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), {}, batch[-1]
    raise DataError("a training batch must be (inputs..., target) or a dict with 'labels', "
                    f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def inputs_of(batch: Any) -> Any:
    """A training batch without its target, as ``compress`` takes calibration batches."""
    args, kwargs, _ = split_batch(batch)
    if kwargs:
        return kwargs
    return args[0] if len(args) == 1 else args


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, an object with ``.logits``, a dict, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(f"cannot find logits in a model output of type {type(output).__name__}: "
                    "return a tensor, a tuple starting with the logits, or an object with .logits")


# -- the loss --------------------------------------------------------------------------------
def kd_loss(student: torch.Tensor, teacher: torch.Tensor | None, target: torch.Tensor, alpha: float,
            temperature: float = 1.0, task_loss: TaskLoss | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``α·task + (1 − α)·T²·KL(p_teacher ‖ p_student)``, classes on the last axis.

    Returns the loss and its parts (as floats). Token-level logits ``(B, L, C)`` are
    flattened to ``(B·L, C)``; the default task loss is cross-entropy (ignore index −100).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha}")
    if teacher is not None and teacher.shape != student.shape:
        raise DataError(f"teacher logits have shape {tuple(teacher.shape)} but the student's have "
                        f"{tuple(student.shape)}: distillation needs outputs of the same shape")
    parts, loss = {}, student.new_zeros(())
    if alpha > 0:
        task = (task_loss or _cross_entropy)(student, target)
        loss = loss + alpha * task
        parts["task"] = float(task.detach())
    if alpha < 1:
        if teacher is None:
            raise ConfigError(f"alpha = {alpha} < 1 needs a teacher; pass one, or alpha=1 for plain fine-tuning")
        t = temperature
        s_log = F.log_softmax(student.reshape(-1, student.shape[-1]).float() / t, dim=-1)
        t_log = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float() / t, dim=-1)
        kl = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)
        loss = loss + (1 - alpha) * kl
        parts["kd"] = float(kl.detach())
    return loss, parts


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


# -- evaluation ------------------------------------------------------------------------------
def accuracy(model: nn.Module, data: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` on labelled batches (under torchrun: over all ranks' shards)."""
    rank, world = distributed_rank()
    device = torch.device(device) if device is not None else _device_of(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for index, batch in enumerate(data):
            if index % world != rank:
                continue
            args, kwargs, target = _to(split_batch(batch), device)
            pred = logits_of(model(*args, **kwargs)).argmax(dim=-1)
            keep = target != -100
            correct += int((pred[keep] == target[keep]).sum())
            total += int(keep.sum())
    model.train(was_training)
    if world > 1:
        counts = torch.tensor([correct, total], dtype=torch.float64)
        torch.distributed.all_reduce(counts)
        correct, total = int(counts[0]), int(counts[1])
    if not total:
        raise DataError("no labelled samples to evaluate: the validation data is empty")
    return correct / total


# -- the driver ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistillResult:
    """What a fine-tuning run did: steps taken, last loss, per-epoch metrics, wall time."""

    steps: int
    loss: float
    history: tuple[dict[str, Any], ...]
    seconds: float
    optimizer_state: dict[str, Any] = dataclasses.field(repr=False, default_factory=dict)


def distill(student: nn.Module, teacher: nn.Module | None, train_data: Iterable[Any],
            config: DistillConfig = DistillConfig(), *, val_data: Iterable[Any] | None = None,
            evaluate: Callable[[nn.Module], float] | None = None, task_loss: TaskLoss | None = None,
            log_path: str | os.PathLike | None = None, device: torch.device | str | None = None) -> DistillResult:
    """Fine-tune ``student`` (in place) with the RMT-KD loss against a frozen ``teacher``.

    ``evaluate(model) -> float`` (default: :func:`accuracy` on ``val_data``) runs after each
    epoch. Metrics go to ``log_path`` as JSON lines. A NaN or infinite loss raises
    :class:`~fxcompress.errors.TrainingError` naming the step; the caller decides to roll back.
    """
    require_instance(config, DistillConfig, "config")
    require_reiterable(train_data, "train_data")
    if teacher is None and config.alpha < 1:
        raise ConfigError(f"alpha = {config.alpha} < 1 needs a teacher; pass one, or alpha=1 for plain fine-tuning")
    with rng_kept():
        return _distill(student, teacher, train_data, config, val_data, evaluate, task_loss, log_path, device)


def rng_kept() -> contextlib.AbstractContextManager:
    """The global RNGs (the CPU's, and every CUDA device's in use) get their state back on exit:
    fine-tuning seeds them for reproducible shuffles and dropout, and the caller's draws stay theirs."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else [])


def _distill(student: nn.Module, teacher: nn.Module | None, train_data: Iterable[Any], config: DistillConfig,
             val_data: Iterable[Any] | None, evaluate: Callable[[nn.Module], float] | None,
             task_loss: TaskLoss | None, log_path: str | os.PathLike | None,
             device: torch.device | str | None) -> DistillResult:
    rank, world = distributed_rank()
    device = torch.device(device) if device is not None else _device_of(student)
    per_epoch = _count_steps(train_data, world)
    total_steps = min(per_epoch * config.epochs, config.max_steps or math.inf)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, int(total_steps)))
    model = _wrap(student, device, world)
    if evaluate is None and val_data is not None:
        evaluate = lambda m: accuracy(m, val_data, device)  # noqa: E731
    teacher_mode = teacher.training if teacher is not None else False
    teacher_buffers = {name: b.detach().clone() for name, b in teacher.named_buffers()} if teacher is not None else {}
    if teacher is not None:
        teacher.eval()
    logger = _Logger(log_path if rank == 0 else None)
    history: list[dict[str, Any]] = []
    start, step, last = time.perf_counter(), 0, float("nan")
    bar = _progress(int(total_steps), config.progress and rank == 0)
    try:
        for epoch in range(config.epochs):
            torch.manual_seed(config.seed + epoch)  # a shuffling DataLoader draws its order from here
            model.train()
            for index, batch in enumerate(_shard(train_data, rank, world, per_epoch)):
                if step >= total_steps:
                    break
                args, kwargs, target = _to(split_batch(batch), device)
                with _autocast(device, config.amp):
                    out = logits_of(model(*args, **kwargs))
                    with torch.no_grad():
                        ref = logits_of(teacher(*args, **kwargs)) if teacher is not None and config.alpha < 1 else None
                loss, parts = kd_loss(out, ref, target, config.alpha, config.temperature, task_loss)
                loss_value = loss.detach()
                if not torch.isfinite(loss_value):
                    raise TrainingError(f"the loss became {loss_value.item()} at step {step} (epoch {epoch}, batch {index}); "
                                        "lower the learning rate or clip gradients harder")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                optimizer.step()
                schedule.step()
                step, last = step + 1, float(loss_value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last:.4f}")
                if step % config.log_every == 0:
                    logger.write({"step": step, "epoch": epoch, "loss": last, **parts, "lr": schedule.get_last_lr()[0]})
            record = {"epoch": epoch, "step": step, "loss": last}
            if evaluate is not None:
                record["val"] = float(evaluate(student))
                if bar is not None:
                    bar.set_postfix(loss=f"{last:.4f}", val=f"{record['val']:.4f}")
            logger.write(record)
            history.append(record)
            if step >= total_steps:
                break
    finally:
        if bar is not None:
            bar.close()
        if teacher is not None:
            teacher.train(teacher_mode)
            _restore_buffers(teacher, teacher_buffers)  # a frozen teacher: what its forward wrote is undone
    return DistillResult(step, last, tuple(history), time.perf_counter() - start, optimizer.state_dict())


# -- internals -------------------------------------------------------------------------------
def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _to(split: tuple[tuple, dict, Any], device: torch.device) -> tuple[tuple, dict, Any]:
    move = lambda v: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # noqa: E731
    args, kwargs, target = split
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}, move(target)


def _count_steps(data: Iterable[Any], world: int) -> int:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in data)
    if n // world == 0:
        raise DataError("the training data is empty" if n == 0 else
                        f"{n} training batches cannot feed {world} processes: give at least one batch per process")
    return n // world


def _shard(data: Iterable[Any], rank: int, world: int, per_rank: int) -> Iterable[Any]:
    """Batches ``rank, rank + world, …``, the same count on every rank (DDP needs equal steps)."""
    taken = 0
    for index, batch in enumerate(data):
        if taken >= per_rank:
            return
        if index % world == rank:
            taken += 1
            yield batch


def _optimizer(params: list[nn.Parameter], config: DistillConfig) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("the student has no trainable parameters (requires_grad is False everywhere)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_lambda(config: DistillConfig, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(total - config.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - config.warmup_steps, span) / span))
    return factor


def _wrap(student: nn.Module, device: torch.device, world: int) -> nn.Module:
    student.to(device)
    if world == 1:
        return student
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fine-tune", leave=False, dynamic_ncols=True)


class _Logger:
    """JSON lines, appended and flushed per record (a log, so a killed run keeps what it had)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")
