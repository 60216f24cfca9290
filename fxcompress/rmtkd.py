"""The RMT-KD loop: analyse → project → fine-tune with self-distillation, group by group.

Each round narrows the next width group(s) of the model with :func:`fxcompress.compress`
(the spectrum of its activations on a calibration subset picks ``k``), then fine-tunes the
narrower model with the previous one as its teacher (:func:`fxcompress.distill`). Groups
are taken in graph order, early layers first; the noise bulk of each spectrum, not a fixed
ratio, decides how much each loses, so early layers (few spikes) shrink most. The loop
stops on the paper's criteria: validation accuracy below the floor (that round is rolled
back), no noise directions left in a full pass over the groups, or the target reduction
reached; and on a diverged fine-tune (rolled back too).

After every round a checkpoint (the model's state dict, the steps that rebuild its
architecture, the fine-tune's optimiser state, the RNG state and the round history) is
written atomically; ``resume=True`` continues a killed run from its last finished round.
Checkpoints hold only tensors and plain values: ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.analysis import analyze_graph
from fxcompress.atomic import atomic_path, write_text
from fxcompress.calibrate import as_call, distributed_rank
from fxcompress.capture import capture
from fxcompress.compress import CompressConfig, CompressResult, compress, num_parameters, rebuild
from fxcompress.distill import DistillConfig, TaskLoss, accuracy, distill, inputs_of, rng_kept
from fxcompress.errors import ConfigError, DataError, TrainingError
from fxcompress.surgery import narrowed_copy, save_pretrained
from fxcompress.validate import check_fields, check_range, require_instance, require_reiterable

log = logging.getLogger(__name__)  # a line per round as it ends: logging.basicConfig(level=logging.INFO)

FORMAT = "fxcompress-rmtkd/1"
CHECKPOINT = "checkpoint.pt"
STOPS = {
    "target-reached": "the parameter reduction reached the target",
    "accuracy-floor": "validation accuracy fell below the floor; that round was rolled back",
    "no-noise-left": "a full pass over the groups found no noise directions to remove",
    "max-passes": "the allowed passes over the groups are done",
    "max-rounds": "the allowed rounds are done",
    "diverged": "fine-tuning diverged; rolled back to the last good round",
}


@dataclasses.dataclass(frozen=True)
class RMTKDConfig:
    """The loop's settings. The floor is ``accuracy_floor``, or the baseline minus ``max_drop``."""

    # agreement="auto" (the default) is None here, as in the paper: each round takes the rule's own
    # widths and the accuracy floor (with its rollback) stops the loop; a level per round compounds
    compress: CompressConfig = CompressConfig()
    distill: DistillConfig = DistillConfig()
    max_drop: float = 0.02
    accuracy_floor: float | None = None
    target_reduction: float = 0.8
    calib_fraction: float = 0.1
    groups_per_round: int = 1
    max_passes: int = 2
    max_rounds: int | None = None
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        check_range(self, "calib_fraction", 0, 1, open_low=True)
        check_range(self, "target_reduction", 0, 1, open_low=True, open_high=True)
        check_range(self, "max_drop", 0)
        for name in ("groups_per_round", "max_passes", "max_rounds"):
            check_range(self, name, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Round:
    """One analyse → project → fine-tune cycle."""

    index: int
    pass_index: int
    groups: tuple[str, ...]
    widths: dict[str, list[int]]  # group → [d, k]
    sigma2: dict[str, float | None]
    lambda_plus: dict[str, float | None]
    params_before: int
    params_after: int
    accuracy_projected: float | None  # right after the projection, before fine-tuning
    accuracy: float | None  # after fine-tuning
    accepted: bool
    seconds: float
    note: str = ""

    @property
    def narrowed(self) -> bool:
        return any(k < d for d, k in self.widths.values())


@dataclasses.dataclass(frozen=True, eq=False)
class RMTKDResult:
    """The compressed model, the steps that rebuild it, and what every round did."""

    module: GraphModule
    steps: tuple[dict[str, Any], ...]
    rounds: tuple[Round, ...]
    baseline: float
    floor: float
    stop: str
    params_original: int
    params_final: int
    accuracy: float
    seconds: float
    source: Any = dataclasses.field(default=None, repr=False)  # the model given to rmtkd (never mutated)
    example: tuple[tuple, dict] | None = dataclasses.field(default=None, repr=False)  # (args, kwargs) of capture

    def to_module(self, model: nn.Module | None = None) -> nn.Module:
        """The final model as an instance of its own class: see :meth:`CompressResult.to_module`."""
        return narrowed_copy(self.source if model is None else model, self.module, self.example)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """A folder stock ``from_pretrained`` loads: see :meth:`CompressResult.save_pretrained`."""
        return save_pretrained(self.source, self.module, self.example, path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compressed model to the folder ``path`` (safetensors, JSON and a
        ``torch.export`` program; no pickle): :func:`fxcompress.load` reads it back."""
        from fxcompress.saved import save  # saved rebuilds through this module
        return save(self, path)

    @property
    def reduction(self) -> float:
        return 1 - self.params_final / self.params_original

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "floor": self.floor, "accuracy": self.accuracy, "stop": self.stop,
                "stop_reason": STOPS[self.stop], "params_original": self.params_original,
                "params_final": self.params_final, "reduction": self.reduction, "seconds": self.seconds,
                "steps": list(self.steps), "rounds": [dataclasses.asdict(r) for r in self.rounds]}

    def __str__(self) -> str:
        lines = [f"RMT-KD: {self.params_original:,} → {self.params_final:,} parameters ({self.reduction:.1%} fewer), "
                 f"accuracy {self.baseline:.4f} → {self.accuracy:.4f} (floor {self.floor:.4f}); "
                 f"stopped: {STOPS[self.stop]}",
                 ""]
        rows = []
        for r in self.rounds:
            if not r.narrowed:
                continue
            widths = ", ".join(f"{d}→{k}" for d, k in r.widths.values() if k < d)
            names = ", ".join(g for g in r.groups if r.widths[g][1] < r.widths[g][0])
            tuned = "—" if r.accuracy is None else f"{r.accuracy:.4f}"
            projected = "—" if r.accuracy_projected is None else f"{r.accuracy_projected:.4f}"
            rows.append((r, names, widths, projected, tuned))
        width = max([32, *(len(names) for _, names, _, _, _ in rows)])  # whole names, never cut
        lines[-1] = f"{'round':>5} {'group':{width}s} {'d → k':>11} {'params':>12} {'projected':>9} {'tuned':>7} {'s':>6}  "
        for r, names, widths, projected, tuned in rows:
            lines.append(f"{r.index:5d} {names:{width}s} {widths:>11} {r.params_after:12,d} {projected:>9} {tuned:>7} "
                         f"{r.seconds:6.1f}  {'' if r.accepted else 'rolled back: ' + r.note}")
        return "\n".join(lines)


def rmtkd(model: Any, train_data: Iterable[Any], val_data: Iterable[Any] | None = None,
          config: RMTKDConfig = RMTKDConfig(), *, calib_data: Iterable[Any] | None = None,
          evaluate: Callable[[nn.Module], float] | None = None, task_loss: TaskLoss | None = None,
          out_dir: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
          plots: bool = False, on_round: Callable[[Round], None] | None = None) -> RMTKDResult:
    """Compress a trained ``model`` by RMT-KD; the model itself is never modified.

    ``train_data``/``val_data`` yield labelled batches (see :func:`fxcompress.distill`);
    ``evaluate(model) -> float`` replaces the default validation accuracy. The calibration
    subset is ``config.calib_fraction`` of ``train_data``, drawn from ``config.seed``,
    unless ``calib_data`` (unlabelled batches) is given. With ``out_dir``: a checkpoint
    after every round, ``report.json``, the fine-tune metrics as JSON lines and (with
    ``plots``) one spectrum plot per narrowed group; ``resume=True`` continues from there.
    An ``out_dir`` that holds an earlier run is refused unless ``resume=True`` (continue it)
    or ``overwrite=True`` (start afresh), and two runs never share one (a lock). The global
    RNG state is the same after the call as before.
    """
    require_instance(config, RMTKDConfig, "config")
    require_reiterable(train_data, "train_data")
    if val_data is not None:
        require_reiterable(val_data, "val_data")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ConfigError("resume=True needs out_dir, where the checkpoint is")
    if resume and overwrite:
        raise ConfigError("resume=True continues the run in out_dir and overwrite=True discards it: pass one")
    with rng_kept(), _claimed(out, resume, overwrite):
        return _run(model, train_data, val_data, config, calib_data, evaluate, task_loss, out, resume, plots, on_round)


def _run(model, train_data, val_data, config: RMTKDConfig, calib_data, evaluate, task_loss, out: Path | None,
         resume: bool, plots: bool, on_round) -> RMTKDResult:
    start = time.perf_counter()
    rank, _ = distributed_rank()
    first = next(iter(train_data), None)
    if first is None:
        raise DataError("the training data is empty")
    example = inputs_of(first)
    base = capture(model, *as_call(example))
    if evaluate is None:
        if val_data is None:
            raise ConfigError("give val_data (labelled batches) or evaluate=, to watch accuracy against the floor")
        evaluate = lambda m: accuracy(m, val_data)  # noqa: E731
    calib = list(calib_data) if calib_data is not None else calibration_subset(train_data, config.calib_fraction, config.seed)
    order = [g.name for g in analyze_graph(base).groups if not g.frozen and g.probe is not None]
    state = _State.load(out, base, example, config, order, train_data) \
        if resume and out is not None and (out / CHECKPOINT).exists() else None
    if state is None:
        baseline = float(evaluate(base))
        floor = config.accuracy_floor if config.accuracy_floor is not None else baseline - config.max_drop
        if baseline < floor:
            raise ConfigError(f"the model's validation accuracy {baseline:.4f} is below the floor {floor:.4f}: "
                              "train it further first (RMT-KD starts from a model that passes the threshold)")
        state = _State(base, [], [], 0, 0, baseline, floor, baseline, {})
    current = state.current
    stop = state.stop  # a finished run resumes as finished
    while stop is None:
        stop = _stop_before_round(current, base, state, order, config)
        if stop is not None:
            break
        if state.position >= len(order):
            state.pass_index, state.position = state.pass_index + 1, 0
        groups = tuple(order[state.position: state.position + config.groups_per_round])
        record, student, step, optimizer_state = _round(current, groups, calib, train_data, config, state, evaluate,
                                                        task_loss, out, plots and rank == 0)
        state.rounds.append(record)
        state.position += len(groups)
        if record.accepted and record.narrowed:
            current = student
            state.steps.append(step)
            state.optimizer, state.accuracy = optimizer_state, record.accuracy
        elif not record.accepted:
            stop = "diverged" if record.note.startswith("diverged") else "accuracy-floor"
            warnings.warn(f"RMT-KD round {record.index} rolled back: {record.note}", stacklevel=3)
        state.current, state.stop = current, stop
        if out is not None and rank == 0:
            state.save(out, base, config, train_data)
        _barrier()
        log.info("round %d: %s; %s → %s parameters, accuracy %s projected, %s tuned (%.1f s)%s", record.index,
                 ", ".join(f"{g} {d}→{k}" for g, (d, k) in record.widths.items() if k < d) or "nothing narrowed",
                 f"{record.params_before:,}", f"{record.params_after:,}", _accuracy(record.accuracy_projected),
                 _accuracy(record.accuracy), record.seconds, "" if record.accepted else f"; rolled back: {record.note}")
        if on_round is not None:
            on_round(record)
    result = RMTKDResult(current, tuple(state.steps), tuple(state.rounds), state.baseline, state.floor, stop,
                         num_parameters(base), num_parameters(current), state.accuracy, time.perf_counter() - start,
                         model, as_call(example))
    if out is not None and rank == 0:
        write_text(out / "report.json", json.dumps(result.to_dict(), indent=2))
    return result


def _stop_before_round(current: GraphModule, base: GraphModule, state: "_State", order: list[str],
                       config: RMTKDConfig) -> str | None:
    if 1 - num_parameters(current) / num_parameters(base) >= config.target_reduction:
        return "target-reached"
    if config.max_rounds is not None and sum(r.narrowed for r in state.rounds) >= config.max_rounds:
        return "max-rounds"
    if state.position >= len(order):
        if not any(r.narrowed and r.accepted for r in state.rounds if r.pass_index == state.pass_index):
            return "no-noise-left"
        if state.pass_index + 1 >= config.max_passes:
            return "max-passes"
    return None


def calibration_subset(train_data: Iterable[Any], fraction: float, seed: int) -> list[Any]:
    """``fraction`` of the training data (inputs only), drawn reproducibly from ``seed``.

    From a DataLoader over a map-style dataset, samples are drawn and batched as the loader
    batches them; from any other iterable, whole batches are drawn.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = getattr(train_data, "dataset", None)
    if isinstance(train_data, torch.utils.data.DataLoader) and hasattr(dataset, "__len__") \
            and not isinstance(dataset, torch.utils.data.IterableDataset):
        n = len(dataset)
        picked = torch.randperm(n, generator=generator)[: max(1, math.ceil(fraction * n))].sort().values.tolist()
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, picked), batch_size=train_data.batch_size,
                                             collate_fn=train_data.collate_fn)
        return [inputs_of(b) for b in loader]
    batches = list(train_data)
    if not batches:
        raise DataError("the training data is empty")
    picked = torch.randperm(len(batches), generator=generator)[: max(1, math.ceil(fraction * len(batches)))]
    return [inputs_of(batches[i]) for i in sorted(picked.tolist())]


# -- one round --------------------------------------------------------------------------------
def _round(current: GraphModule, groups: tuple[str, ...], calib: list[Any], train_data: Iterable[Any],
           config: RMTKDConfig, state: "_State", evaluate: Callable[[nn.Module], float], task_loss: TaskLoss | None,
           out: Path | None, plots: bool) -> tuple[Round, GraphModule, dict[str, Any], dict]:
    """One round: the record, the fine-tuned student, its :attr:`CompressResult.step`, the optimiser state."""
    start = time.perf_counter()
    index = len(state.rounds)
    own = {"agreement": None} if config.compress.agreement == "auto" else {}  # the rule's own widths
    result = compress(current, calib, dataclasses.replace(config.compress, targets=groups, **own))
    by_name = {r.name: r for r in result.report}
    fields = dict(index=index, pass_index=state.pass_index, groups=groups,
                  widths={g: [by_name[g].d, by_name[g].k] for g in groups},
                  sigma2={g: by_name[g].sigma2 for g in groups}, lambda_plus={g: by_name[g].lambda_plus for g in groups},
                  params_before=result.params_before, params_after=result.params_after)
    if not result.compressed:
        return Round(**fields, accuracy_projected=None, accuracy=None, accepted=True,
                     seconds=time.perf_counter() - start, note="no noise directions"), current, result.step, {}
    if plots and out is not None:
        _plot(result, out / "spectra", index)
    student = result.module
    projected = float(evaluate(student))
    tune = dataclasses.replace(config.distill, seed=config.seed + 1000 * (index + 1))
    log = out / "metrics.jsonl" if out is not None else None
    try:
        tuned = distill(student, current, train_data, tune, evaluate=None, task_loss=task_loss, log_path=log)
    except TrainingError as exc:
        return Round(**fields, accuracy_projected=projected, accuracy=None, accepted=False,
                     seconds=time.perf_counter() - start, note=f"diverged: {exc}"), current, result.step, {}
    score = float(evaluate(student))
    accepted = score >= state.floor
    note = "" if accepted else f"accuracy {score:.4f} < floor {state.floor:.4f}"
    return Round(**fields, accuracy_projected=projected, accuracy=score, accepted=accepted,
                 seconds=time.perf_counter() - start, note=note), student, result.step, tuned.optimizer_state


def _plot(result: CompressResult, folder: Path, index: int) -> None:
    from fxcompress.spectral import plot_spectrum

    for group in result.compressed:
        selection = result.selections.get(group.name)
        if selection is not None:
            plot_spectrum(selection, folder / f"round{index:02d}-{group.name}.png", title=f"round {index}: {group.name}")


# -- the output folder ------------------------------------------------------------------------
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "report.json", "spectra")
LOCK = ".lock"


@contextlib.contextmanager
def _claimed(out: Path | None, resume: bool, overwrite: bool) -> Iterator[None]:
    """Hold ``out`` for this run (rank 0 writes there): refuse a folder another run holds, or one
    with an earlier run's files unless resuming or told to overwrite them."""
    if out is None or distributed_rank()[0] != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another RMT-KD run is writing to {out}: wait for it, or use another out_dir") from None
        earlier = [name for name in RUN_FILES if (out / name).exists()]
        if earlier and not resume:
            if not overwrite:
                raise ConfigError(f"{out} holds an earlier run ({', '.join(earlier)}): pass resume=True to continue "
                                  "it, overwrite=True to start afresh, or another out_dir")
            for name in earlier:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- checkpoints ------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    current: GraphModule
    steps: list[dict[str, Any]]
    rounds: list[Round]
    pass_index: int
    position: int
    baseline: float
    floor: float
    accuracy: float  # of ``current``
    optimizer: dict[str, Any]
    stop: str | None = None

    def save(self, out: Path, base: GraphModule, config: RMTKDConfig, train_data: Any) -> None:
        payload = {
            "format": FORMAT, "fingerprint": _fingerprint(base), "config": json.dumps(config.to_dict(), sort_keys=True),
            "steps": json.dumps(self.steps), "rounds": json.dumps([dataclasses.asdict(r) for r in self.rounds]),
            "pass_index": self.pass_index, "position": self.position, "baseline": self.baseline, "floor": self.floor,
            "accuracy": self.accuracy, "stop": self.stop or "",
            "model": self.current.state_dict(), "optimizer": self.optimizer, "rng": torch.get_rng_state(),
        }
        generator = _loader_generator(train_data)
        if generator is not None:  # a DataLoader with its own generator= shuffles from it, not the global RNG
            payload["loader_rng"] = generator.get_state()
        with atomic_path(out / CHECKPOINT) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, out: Path, base: GraphModule, example: Any, config: RMTKDConfig, order: list[str],
             train_data: Any) -> "_State":
        path = out / CHECKPOINT
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 — any unreadable file gets the same advice
            raise ConfigError(f"cannot read the checkpoint {path}: {exc}; delete it or pass overwrite=True") from None
        _check_payload(payload, path, base, config, order)
        steps = json.loads(payload["steps"])
        rounds = [Round(**{**r, "groups": tuple(r["groups"])}) for r in json.loads(payload["rounds"])]
        current = rebuild(base, example, steps, payload["model"]) if steps else base
        torch.set_rng_state(payload["rng"])
        generator = _loader_generator(train_data)
        if generator is not None and "loader_rng" in payload:
            generator.set_state(payload["loader_rng"])
        return cls(current, steps, rounds, payload["pass_index"], payload["position"], payload["baseline"],
                   payload["floor"], payload["accuracy"], payload["optimizer"], payload["stop"] or None)


def _loader_generator(data: Any) -> torch.Generator | None:
    generator = getattr(data, "generator", None) if isinstance(data, torch.utils.data.DataLoader) else None
    return generator if isinstance(generator, torch.Generator) else None


#: The checkpoint's fields and their types (after ``torch.load``).
SCHEMA = {"format": str, "fingerprint": str, "config": str, "steps": str, "rounds": str, "pass_index": int,
          "position": int, "baseline": float, "floor": float, "accuracy": float, "stop": str, "model": dict,
          "optimizer": dict, "rng": torch.Tensor}


def _check_payload(payload: Any, path: Path, base: GraphModule, config: RMTKDConfig, order: list[str]) -> None:
    """A checkpoint is trusted only as far as it is checked: schema, types, ranges, finite weights."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path} is damaged or tampered with: {what}; delete it or pass overwrite=True")

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} is not an RMT-KD checkpoint of this version ({FORMAT})")
    for key, kind in SCHEMA.items():
        value = payload.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or \
                (kind is float and not math.isfinite(value)):
            raise bad(f"{key!r} is {type(value).__name__ if key in payload else 'missing'}, not a finite {kind.__name__}")
    if payload["fingerprint"] != _fingerprint(base):
        raise ConfigError(f"{path} was written for a different model (its parameter names or shapes differ): "
                          "resume with the model it was made from, or use another out_dir")
    saved = _json(payload["config"], "config", bad)
    differ = _differences(saved, json.loads(json.dumps(config.to_dict(), sort_keys=True)))
    if differ:
        raise ConfigError(f"{path} was written with another RMTKDConfig: {'; '.join(differ)}. Resume with the same "
                          "settings, or use another out_dir")
    if not 0 <= payload["pass_index"] < config.max_passes or not 0 <= payload["position"] <= len(order):
        raise bad(f"pass {payload['pass_index']}, position {payload['position']} lie outside {config.max_passes} "
                  f"passes over {len(order)} groups")
    if payload["stop"] and payload["stop"] not in STOPS:
        raise bad(f"unknown stop {payload['stop']!r}")
    steps, rounds = _json(payload["steps"], "steps", bad), _json(payload["rounds"], "rounds", bad)
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("widths"), dict) for s in steps):
        raise bad("'steps' is not a list of {'widths': …} mappings")
    fields = {f.name for f in dataclasses.fields(Round)}
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and set(r) == fields for r in rounds):
        raise bad(f"'rounds' is not a list of rounds with the fields {sorted(fields)}")
    for name, tensor in payload["model"].items():
        if not isinstance(tensor, torch.Tensor) or (tensor.is_floating_point() and not torch.isfinite(tensor).all()):
            raise bad(f"the model's {name!r} is not a finite tensor")
    if payload["rng"].dtype != torch.uint8 or payload["rng"].shape != torch.get_rng_state().shape:
        raise bad("'rng' is not a CPU generator state")


def _json(text: str, key: str, bad) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"{key!r} is not JSON ({exc})") from None


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ, with both values."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for key in sorted(set(saved) | set(current))
                for d in _differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [f"{prefix[:-1]} was {saved!r}, is now {current!r}"]


def _accuracy(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fingerprint(module: nn.Module) -> str:
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in module.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _barrier() -> None:
    if distributed_rank()[1] > 1:
        torch.distributed.barrier()
