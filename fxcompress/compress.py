"""``fxcompress.compress``: capture → analyse → calibrate → select rank → rewrite.

Example:
    >>> result = compress(model, calib_loader, CompressConfig(rule="fixed", ratio=0.5))   # doctest: +SKIP
    >>> print(result)                                                                       # doctest: +SKIP
    >>> result.module(x)          # a drop-in, narrower, dense torch.fx.GraphModule        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import itertools
import logging
import operator
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.linalg
import threadpoolctl
import torch
from torch.fx import GraphModule

from fxcompress.analysis import Plan, WidthGroup, analyze_graph
from fxcompress.calibrate import EMPTY, as_call, calibrate, calibrate_points
from fxcompress.capture import capture, copy_module, keep_outputs, own_weights, state_kept
from fxcompress.errors import ConfigError, DataError
from fxcompress.rewrite import Projection, fold_batch_norms, fold_norm_weights, norm_scale, plain, rewrite
from fxcompress.spectral import RULES, CovarianceAccumulator, RankSelection, pooled_effective_samples, select_rank
from fxcompress.spectral.mp import TRACY_WIDOM_QUANTILES
from fxcompress.spectral.rules import MP_RULES
from fxcompress.surgery import narrowed_copy, save_pretrained
from fxcompress.validate import check_fields, check_range, require_instance

log = logging.getLogger(__name__)  # progress, stage by stage: logging.basicConfig(level=logging.INFO)

TRANSFORMS = ("auto", "projection", "selection", "magnitude")
#: the agreement level of the spectral rules by default: in the oracle-width study (benchmarks/
#: RESULTS.md) it kept all five tasks within one point of the original after KD, at 1.0–3.8× the
#: smallest model that did, where the rules' own widths were 0.2–18.5× off
DEFAULT_AGREEMENT = 0.8
BUDGETS = ("fixed", "keep-all")  # rules whose widths the user sets: no level unless asked


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """How to compress. By default, the RMT-KD paper's rule (``mp-hist``, q = 0.5) gives each
    group's width relative to the others, and an agreement of 0.8 how deep all of them cut (the
    level the oracle-width study supports); ``agreement=None`` takes the rule's own widths, as
    the paper does.

    Rule options (``q``, ``alpha``, ``tau``, ``ratio``, ``k``) are passed to the rule that
    takes them; ``rule="fixed"`` also takes ``widths``, a width per group name (only those
    groups are then narrowed: matched budgets for baselines). ``targets``: ``"all"`` or group
    names / glob patterns. ``transform``: ``"projection"`` onto the top eigenvectors,
    ``"selection"`` of the channels that best span them, ``"auto"``: selection where only
    that is exact (across ReLU/BatchNorm), projection elsewhere; or ``"magnitude"``: the
    channels whose producer weights have the largest L2 norm (the structured-pruning
    baseline, blind to the activations). ``fold_batchnorm``: fold each BatchNorm into the
    convolution or linear layer before it first (:func:`fxcompress.rewrite.fold_batch_norms`),
    so rotations become exact where BatchNorm alone stopped them; the result has no BatchNorm
    left to train. ``outputs``: ``"all"``, or the names of the outputs the result keeps
    (``("logits",)``); it returns None for the others (an encoder's hidden states returned
    beside the logits), and the widths only they pinned are free to narrow. ``uniform``: the
    groups of one kind (one module path but for its layer numbers, and one size: every layer's
    MLP) take one width, the largest any of them chose, so a config with one width per kind
    can say the result (:meth:`CompressResult.save_pretrained`). ``reconstruct``: where channels
    are selected, the consumers that read them predict the dropped channels from the kept ones
    by least squares on the calibration covariance (:func:`reconstruction`); False drops them
    for their mean, as plain channel pruning does. ``agreement``: the rule gives the widths' shape
    and this target their level: every group's width is scaled by the one factor that leaves
    the smallest model whose top-1 output (the first output's argmax over its last axis) still
    matches the original's on this fraction of the calibration positions, before any
    fine-tuning (:func:`_level`; ``result.level`` says the factor and the agreement reached);
    for a language model the fraction is the original's perplexity over the narrowed one's
    (:class:`Fidelity`). Where no narrowing reaches it, every group stays whole and a
    :class:`CompressionWarning` says so. ``fold_norms``: fold each normalisation's scale into
    the linear layers that read it (:func:`fxcompress.rewrite.fold_norm_weights`; exact), so a
    pre-norm transformer's residual stream rotates exactly. ``params``: a size budget instead
    of a fidelity, the fraction of the parameters outside embedding tables the result keeps
    at most (0.75: 25 % fewer); the rule gives the widths' shape and the budget their level,
    the largest factor that fits (:func:`_budget`), as Torch-Pruning's ratio and SliceGPT's
    slicing are set.
    Its default, ``"auto"`` (:attr:`target_agreement`), is :data:`DEFAULT_AGREEMENT` for the
    spectral rules and None for the budgets (``fixed``, ``keep-all``), whose widths are the
    user's; in :func:`fxcompress.rmtkd` it is None: each round takes the rule's own widths and
    the loop's accuracy floor decides how far to go.
    """

    rule: str = "mp-hist"
    q: float = 0.5
    alpha: float = 0.99
    tau: float = 0.9
    ratio: float | None = None
    k: int | None = None
    widths: Mapping[str, int] | None = None
    min_rank: int = 1
    round_to: int = 8
    targets: str | tuple[str, ...] = "all"
    transform: str = "auto"
    correlated_samples: bool = True
    fold_mean: bool = True
    fold_batchnorm: bool = False
    fold_norms: bool = True
    outputs: str | tuple[str, ...] = "all"
    uniform: bool = False
    reconstruct: bool = True
    agreement: float | Literal["auto"] | None = "auto"
    params: float | None = None

    def __post_init__(self):
        for name in ("targets", "outputs"):  # a list of names reads as naturally as a tuple
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_fields(self)
        check_range(self, "q", 0, 1, open_low=True, open_high=True)
        check_range(self, "tau", 0, 1, open_low=True)
        check_range(self, "ratio", 0, 1, open_low=True)
        check_range(self, "params", 0, 1, open_low=True, open_high=True)
        if self.agreement != "auto":
            check_range(self, "agreement", 0, 1, open_low=True)
        check_range(self, "k", 1)
        check_range(self, "round_to", 1)
        if self.alpha not in TRACY_WIDOM_QUANTILES:
            raise ConfigError(f"CompressConfig.alpha (the Tracy–Widom confidence) must be one of "
                              f"{sorted(TRACY_WIDOM_QUANTILES)}, got {self.alpha!r}")
        if self.widths is not None and any(k < 1 for k in self.widths.values()):
            raise ConfigError(f"CompressConfig.widths must be ≥ 1 per group, got {dict(self.widths)}")
        if isinstance(self.targets, tuple) and not self.targets:
            raise ConfigError('CompressConfig.targets is empty: give group names or patterns, or "all"')
        if isinstance(self.outputs, tuple) and not self.outputs or isinstance(self.outputs, str) and self.outputs != "all":
            raise ConfigError(f'CompressConfig.outputs must be "all" or a non-empty tuple of output names, '
                              f'got {self.outputs!r}')
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose one of {sorted(RULES)}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        given = [name for name in ("ratio", "k", "widths") if getattr(self, name) is not None]
        if self.rule == "fixed" and len(given) != 1:
            raise ConfigError(f'rule="fixed" needs exactly one of ratio=, k= or widths=, got {given or "none"}')
        if self.agreement not in (None, "auto") and (self.widths is not None or self.rule == "keep-all"):
            raise ConfigError("agreement= scales the widths a rule chooses: use it with a spectral rule or a ratio, "
                              "not with widths= or keep-all")
        if self.params is not None and (self.agreement not in (None, "auto") or self.widths is not None
                                        or self.rule == "keep-all"):
            raise ConfigError("params= sets how far a rule's widths are scaled: give it with a spectral rule or a "
                              "ratio, without agreement= (a fidelity level) or widths=")
        if self.widths is not None and self.rule != "fixed":
            raise ConfigError('widths= sets each group\'s k: use it with rule="fixed"')
        if self.min_rank < 1:
            raise ConfigError(f"CompressConfig.min_rank must be ≥ 1 (a group cannot vanish), got {self.min_rank}")

    @property
    def target_agreement(self) -> float | None:
        """The agreement level :func:`compress` will reach: ``agreement``, with ``"auto"`` as
        :data:`DEFAULT_AGREEMENT` for a spectral rule and None for a budget."""
        if self.agreement == "auto":
            return None if self.rule in BUDGETS or self.params is not None else DEFAULT_AGREEMENT
        return self.agreement

    def rule_options(self, group: str | None = None) -> dict[str, Any]:
        if self.widths is not None:
            return {"k": self.widths[group], "min_rank": self.min_rank, "round_to": 1}
        accepted = list(inspect.signature(RULES[self.rule]).parameters)[1:]
        options = {name: getattr(self, name) for name in accepted if getattr(self, name, None) is not None}
        return {**options, "min_rank": self.min_rank, "round_to": self.round_to}


@dataclasses.dataclass(frozen=True)
class GroupReport:
    """What happened to one width group."""

    name: str
    d: int
    k: int
    rule: str | None
    sigma2: float | None
    lambda_plus: float | None
    n_signal: int | None
    transform: str | None
    exact: bool
    frozen_by: tuple[str, ...]
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class CompressResult:
    """The compressed module, the plan it was made from, and the per-group report."""

    module: GraphModule
    plan: Plan
    report: tuple[GroupReport, ...]
    params_before: int
    params_after: int
    seconds: float
    fold_mean: bool = True
    selections: Mapping[str, RankSelection] = dataclasses.field(default_factory=dict, repr=False)
    fold_batchnorm: bool = False
    outputs: tuple[str, ...] | None = None  # the outputs kept, where not all
    # max |compressed − original| / max |original| over the outputs, on the first calibration
    # batch (a batch the widths were chosen on, so a floor on what new data will see); None
    # where the model was in training mode (dropout draws differ)
    output_change: float | None = None
    source: Any = dataclasses.field(default=None, repr=False)  # the model given to compress (never mutated)
    example: tuple[tuple, dict] | None = dataclasses.field(default=None, repr=False)  # (args, kwargs) of capture
    # with CompressConfig.agreement: (the factor the rule's widths were scaled by, the fidelity
    # to the original on the calibration data that it reached); with params: (the factor, the
    # fraction of the parameters outside embeddings kept). level_by names the second.
    level: tuple[float, float] | None = None
    level_by: str | None = None

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write a transformers model as a folder its class's stock ``from_pretrained`` loads
        (the config takes the new widths), checked against :attr:`module` after loading. A
        family qualifies when its config has a width per kind and every layer of a kind
        narrowed alike (``CompressConfig(uniform=True)``); else a :class:`SurgeryError` says
        what differs. See :func:`fxcompress.surgery.save_pretrained`."""
        return save_pretrained(self.source, self.module, self.example, path)

    def to_module(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The narrowed model as an instance of its own class (``generate``, ``save_pretrained``
        and the class's own methods keep working): a copy of ``model`` (by default the one
        ``compress`` was given) with the compressed tensors, checked against :attr:`module` on
        the example batch to 1e-5. See :mod:`fxcompress.surgery`."""
        return narrowed_copy(self.source if model is None else model, self.module, self.example)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compressed model to the folder ``path`` (safetensors, JSON and a
        ``torch.export`` program; no pickle): :func:`fxcompress.load` reads it back."""
        from fxcompress.saved import save  # saved rebuilds through this module
        return save(self, path)

    @property
    def compressed(self) -> tuple[GroupReport, ...]:
        return tuple(r for r in self.report if r.k < r.d)

    @property
    def step(self) -> dict[str, Any]:
        """The architecture change, as :func:`rebuild` replays it: the new widths, and
        whether consumers got a mean-folding bias. JSON-serialisable."""
        step = {"widths": {r.name: r.k for r in self.compressed}, "fold_mean": self.fold_mean}
        if self.outputs is not None:
            step["outputs"] = list(self.outputs)
        return {**step, "fold_batchnorm": True} if self.fold_batchnorm else step

    def to_dict(self) -> dict[str, Any]:
        return {"params_before": self.params_before, "params_after": self.params_after, "seconds": self.seconds,
                "output_change": self.output_change, "level": self.level,
                "level_by": self.level_by, "step": self.step,
                "groups": [dataclasses.asdict(r) for r in self.report]}

    def __str__(self) -> str:
        reduction = 1 - self.params_after / self.params_before
        lines = [f"fxcompress: {self.params_before:,} → {self.params_after:,} parameters ({reduction:.1%} fewer), "
                 f"{len(self.compressed)} of {len(self.report)} groups narrowed in {self.seconds:.1f} s"]
        if not self.compressed:
            lines.append("  nothing was compressible: every group is frozen or kept whole (see the report)")
        for r in self.report:
            status = f"frozen: {r.frozen_by[0]}" if r.frozen_by else f"{r.d} → {r.k} ({r.rule}, {r.transform}, " + \
                ("exact at k = d" if r.exact else "approximate") + ")"
            lines.append(f"  {r.name:40s} {status}")
        if self.level is not None:
            what = "of the parameters outside embeddings kept" if self.level_by == "parameters" else \
                f"fidelity to the original on the calibration data ({self.level_by})"
            lines.append(f"  level: the rule's widths × {self.level[0]:.3f}, {self.level[1]:.1%} {what}")
        if self.output_change is not None:
            lines.append(f"  output change on the first calibration batch: {self.output_change:.1%} of the largest output "
                         "(\"exact at k = d\": the transform loses nothing before narrowing; narrowing does)")
        return "\n".join(lines)


def compress(model: Any, calib_data: Iterable[Any], config: CompressConfig = CompressConfig(),
             example_inputs: Any = None) -> CompressResult:
    """Compress ``model`` with the spectra of its activations on ``calib_data``.

    ``model`` is an ``nn.Module``, a ``GraphModule`` or an ``ExportedProgram``; it is never
    modified. ``calib_data`` yields batches as a DataLoader does (a tensor, a tuple of
    tensors, or a dict of keyword inputs; a labelled ``(inputs…, target)`` batch, one element
    more than ``forward`` takes, loses its target); its first batch is the example input for
    capture unless ``example_inputs`` is given.
    """
    start = time.perf_counter()
    require_instance(config, CompressConfig, "config")
    batches = _without_targets(model, _batches(calib_data))
    args, kwargs = as_call(example_inputs if example_inputs is not None else batches[0])
    gm = capture(model, args, kwargs, share_weights=True)  # nothing below writes to a weight
    if config.outputs != "all":
        keep_outputs(gm, config.outputs)
    if config.fold_batchnorm:
        gm = fold_batch_norms(gm)
    if config.fold_norms:
        gm = fold_norm_weights(gm)
    log.info("captured %s: %d nodes (%.1f s)", type(model).__name__, len(gm.graph.nodes), time.perf_counter() - start)
    plan = analyze_graph(gm)
    targets = _targets(plan, config)
    log.info("%d width groups, %d to calibrate on %d batches (%.1f s)", len(plan.groups), len(targets), len(batches),
             time.perf_counter() - start)
    reads = {g.name: points for g in targets if (points := _pooled_reads(gm, g))}
    accs = calibrate(gm, targets, batches, config.correlated_samples, reads) if targets else {}
    log.info("calibrated (%.1f s)", time.perf_counter() - start)
    decisions = _select(gm, targets, accs, config)
    if config.uniform:
        decisions = _uniform(gm, targets, accs, decisions, config)
    level = level_by = None
    target = config.target_agreement
    if config.params is not None:
        decisions, level = _budget(gm, plan, targets, accs, decisions, batches, config)
        level_by = "parameters"
    elif target is not None:
        if getattr(model, "training", False):
            default = " (the spectral rules' default level)" if config.agreement == "auto" else ""
            raise ConfigError(f"CompressConfig.agreement={target}{default} compares the outputs of the original and "
                              "the narrowed model, which dropout would draw anew: the model is in training mode; call "
                              "model.eval() first, or pass agreement=None for the rule's own widths")
        decisions, level, level_by = _level(gm, plan, targets, accs, decisions, batches, config, target)
    elif config.reconstruct:
        narrowed = {name: decision for name, decision in decisions.items() if decision[0] is not None}
        decisions = _lifted(decisions, _read_statistics(gm, plan, narrowed, accs, batches), config.fold_mean)
    projections = {name: proj for name, (proj, _, _) in decisions.items() if proj is not None}
    log.info("widths chosen: %d of %d groups narrow (%.1f s)", len(projections), len(targets),
             time.perf_counter() - start)
    before = num_parameters(gm)
    measure = bool(projections) and not getattr(model, "training", False)  # dropout would draw anew
    reference = _run(gm, args, kwargs) if measure else None
    module = rewrite(gm, plan, projections, inplace=True)  # gm is this call's own capture
    own_weights(module, model)  # copies what the rewrite left as it was: the result is the caller's to train
    report = tuple(_report(g, decisions.get(g.name)) for g in plan.groups)
    selections = {name: sel for name, (_, sel, _) in decisions.items() if sel is not None}
    change = _change(reference, _run(module, args, kwargs)) if measure else 0.0 if not projections else None
    log.info("rewritten: %s → %s parameters (%.1f s)", f"{before:,}", f"{num_parameters(module):,}",
             time.perf_counter() - start)
    return CompressResult(module, plan, report, before, num_parameters(module),
                          time.perf_counter() - start, config.fold_mean, selections, config.fold_batchnorm,
                          None if config.outputs == "all" else config.outputs, change, model, (args, kwargs), level,
                          level_by)


def _run(module: GraphModule, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The floating-point outputs of one call, as a flat list (the module's state kept)."""
    with torch.no_grad(), state_kept(module):
        out = module(*args, **kwargs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _change(reference: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """The largest absolute change of any output entry, relative to the largest original entry."""
    pairs = [(r.double(), o.double()) for r, o in zip(reference, out) if r.shape == o.shape]
    scale = max((float(r.abs().max()) for r, _ in pairs if r.numel()), default=0.0)
    change = max((float((o - r).abs().max()) for r, o in pairs if r.numel()), default=0.0)
    return change / scale if scale > 0 else change


def rebuild(model: Any, example_inputs: Any, steps: Sequence[Mapping[str, Any]],
            state_dict: Mapping[str, torch.Tensor] | None = None) -> GraphModule:
    """The compressed architecture again, from the original ``model`` and the ``steps`` taken.

    ``steps`` are :attr:`CompressResult.step` values, one per ``compress`` call, in order
    (each call compressed the previous one's module). The widths are replayed with
    placeholder weights; ``state_dict`` (the compressed module's) is then loaded strictly,
    so a compressed model is saved as its state dict plus its steps, never as a pickle.
    """
    args, kwargs = as_call(example_inputs)
    module: Any = model
    for number, step in enumerate(steps):
        widths = step.get("widths") if isinstance(step, Mapping) else None
        if not isinstance(widths, Mapping):
            raise ConfigError(f"step {number} must be a mapping with 'widths' (CompressResult.step), got {step!r}")
        gm = capture(module, args, kwargs)
        if step.get("outputs"):
            keep_outputs(gm, tuple(step["outputs"]))
        if step.get("fold_batchnorm", False):
            gm = fold_batch_norms(gm)
        plan = analyze_graph(gm)
        projections = {}
        for name, k in widths.items():
            group = _group_of(plan, name, number)
            size = group.size
            if not isinstance(k, int) or not 0 < k <= size:
                raise ConfigError(f"step {number}: group {name!r} has width {size}; k = {k!r} must lie in [1, {size}]")
            if k % group.blocks:
                raise ConfigError(f"step {number}: group {name!r} is {group.blocks} blocks; k = {k} is not a multiple")
            mean = torch.zeros(size, dtype=torch.float64) if step.get("fold_mean", True) else None
            per_head = [h * group.block_size + i for h in range(group.blocks) for i in range(k // group.blocks)]
            projections[name] = dataclasses.replace(Projection.select(per_head, size), mean=mean)
        module = rewrite(gm, plan, projections, inplace=True)
    if not isinstance(module, GraphModule):
        module = capture(module, args, kwargs)
    if state_dict is not None:
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"the state dict does not fit the rebuilt model (a checkpoint of another model, "
                              f"or steps that do not match it): {str(exc).splitlines()[0]} …") from None
    return module


def _group_of(plan: Plan, name: str, number: int) -> WidthGroup:
    try:
        return plan[name]
    except KeyError as exc:
        raise ConfigError(f"step {number}: {exc.args[0]}: these steps were made from another model") from None


def _batches(calib_data: Iterable[Any]) -> list[Any]:
    if calib_data is None or not isinstance(calib_data, Iterable) or isinstance(calib_data, (str, bytes)):
        raise ConfigError(f"calib_data must be an iterable of batches (a DataLoader, a list of batches), "
                          f"got {type(calib_data).__name__}")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise ConfigError("calib_data must be an iterable of batches (e.g. a DataLoader or a list of batches), "
                          "not a single batch: wrap it in a list")
    batches = list(calib_data)
    if not batches:
        raise DataError(EMPTY)
    return batches


def _without_targets(model: Any, batches: list[Any]) -> list[Any]:
    """Labelled batches ``(inputs…, target)``, as a training DataLoader yields them, without the
    target: where every batch holds one element more than ``model.forward`` takes positionally."""
    first = batches[0]
    if not isinstance(model, torch.nn.Module) or not isinstance(first, (tuple, list)) or len(first) < 2:
        return batches
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return batches
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return batches
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if any(not isinstance(b, (tuple, list)) or len(b) != len(positional) + 1 for b in batches):
        return batches
    return [tuple(b[:-1]) for b in batches]


def _targets(plan: Plan, config: CompressConfig) -> list[WidthGroup]:
    candidates = [g for g in plan.groups if not g.frozen and g.probe is not None and g.block_size > 1]
    if config.widths is not None:
        names = {g.name: g for g in plan.groups}
        for name, k in config.widths.items():
            if name not in names:
                raise ConfigError(f"widths names {name!r}, which is not a width group; groups are: {list(names)}")
            if not isinstance(k, int) or not 0 < k <= names[name].size:
                raise ConfigError(f"widths[{name!r}] = {k!r} must lie in [1, {names[name].size}]")
        candidates = [g for g in candidates if g.name in config.widths]
    if config.targets == "all":
        return candidates
    patterns = (config.targets,) if isinstance(config.targets, str) else tuple(config.targets)
    names = [g.name for g in plan.groups]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"target {pattern!r} matches no width group; groups are: {names}")
    return [g for g in candidates if any(fnmatch.fnmatchcase(g.name, p) for p in patterns)]


def _select(gm: GraphModule, targets: Sequence[WidthGroup], accs: Mapping[str, Sequence[CovarianceAccumulator]],
            config: CompressConfig) -> dict[str, tuple]:
    """Every target's ``(projection or None, selection, transform)``, groups decided in parallel.

    A wide group's spectrum is LAPACK work, which releases the GIL; a head group's is many
    small fits in Python. Groups run on as many threads as torch uses, wide and narrow
    alternating so the two kinds overlap. BLAS is single-threaded meanwhile: OpenBLAS's own
    worker threads only slow small calls down (12 heads took 0.16 s with them, 0.09 s
    without, on 2 cores).
    """
    workers = max(1, min(torch.get_num_threads(), len(targets)))
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        futures = {g.name: pool.submit(_decide_or_keep, gm, g, accs[g.name], config) for g in _interleaved(targets)}
        return {g.name: futures[g.name].result() for g in targets}


def _interleaved(groups: Sequence[WidthGroup]) -> list[WidthGroup]:
    """Widest, narrowest, second widest, second narrowest, …"""
    ordered = sorted(groups, key=lambda g: -g.block_size)
    middle = (len(ordered) + 1) // 2
    pairs = itertools.zip_longest(ordered[:middle], ordered[middle:][::-1])
    return [g for pair in pairs for g in pair if g is not None]


def _decide_or_keep(gm: GraphModule, group: WidthGroup, accs: Sequence[CovarianceAccumulator],
                    config: CompressConfig) -> tuple:
    """:func:`_decide`, or ``(None, None, why)`` for a group whose spectrum says nothing (constant
    activations, fewer than two samples): that group is kept whole and the report says why."""
    try:
        return _decide(gm, group, accs, config)
    except DataError as exc:
        return None, None, f"calibration: {exc}; the group is kept whole"


def _decide(gm: GraphModule, group: WidthGroup, accs: Sequence[CovarianceAccumulator], config: CompressConfig):
    """Each block (attention head, convolution group; the whole group otherwise) has its own
    covariance: its eigenvalues pick k, its leading eigenvectors build that block of P. Blocks
    share the largest k."""
    transform = _transform(group, config)
    options = config.rule_options(group.name)
    if "k" in options:  # a width for the whole group: each head gets its share
        options["k"] = max(options["k"] // group.blocks, 1)
    centered = config.fold_mean  # without a folded mean, the kept directions must hold the mean too
    spectra = [acc.eigenvalues(centered) for acc in accs]
    null = _null(accs, config.rule)
    selections = [select_rank(values, acc.dof(), config.rule, **options, **null) for values, acc in zip(spectra, accs)]
    selection = max(selections, key=lambda sel: sel.k)
    k = max(min(selection.k, group.block_size), 1)
    if k >= group.block_size:
        return None, selection, transform
    mean = torch.from_numpy(np.concatenate([acc.mean() for acc in accs])) if config.fold_mean else None
    norms = _weight_norms(gm, group).split(group.block_size) if transform == "magnitude" else [None] * len(accs)
    parts = [_block(acc, values, k, transform, score, centered) for acc, values, score in zip(accs, spectra, norms)]
    return Projection(parts[0] if len(parts) == 1 else torch.block_diag(*parts), mean), selection, transform


def _read_statistics(gm: GraphModule, plan: Plan, decisions: Mapping[str, tuple],
                     accs: Mapping[str, Sequence[CovarianceAccumulator]], batches: list[Any]
                     ) -> dict[str, dict[str, CovarianceAccumulator]]:
    """For each channel selection among ``decisions``: the activations its consumers read, each
    with its calibration statistics (the probe's own; one more pass over the calibration data
    for the others)."""
    reads = {name: _read_points(gm, plan[name]) for name, (_, selection, transform) in decisions.items()
             if selection is not None and transform == "selection" and plan[name].blocks == 1 and not plan[name].routing}
    probes = {name: (plan[name].probe, plan[name].probe_axis) if not _pooled_reads(gm, plan[name]) else None
              for name in reads}
    others = {point: plan[name].size for name, points in reads.items() for point in points if point != probes[name]}
    measured = calibrate_points(gm, others, batches) if others else {}
    return {name: {point[0]: accs[name][0] if point == probes[name] else measured[point] for point in points}
            for name, points in reads.items()}


def _lifted(decisions: Mapping[str, tuple], statistics: Mapping[str, Mapping[str, CovarianceAccumulator]],
            centered: bool) -> dict[str, tuple]:
    """``decisions`` with each narrowed selection's least-squares read-back at every activation
    its consumers read."""
    out = dict(decisions)
    for name, reads in statistics.items():
        proj, selection, transform = decisions[name]
        if proj is not None:
            lifts = {node: reconstruction(acc, proj.matrix, centered) for node, acc in reads.items()}
            out[name] = (dataclasses.replace(proj, lifts={n: lift for n, lift in lifts.items() if lift is not None}),
                         selection, transform)
    return out


def _level(gm: GraphModule, plan: Plan, targets: Sequence[WidthGroup], accs: Mapping[str, Sequence[CovarianceAccumulator]],
           decisions: Mapping[str, tuple], batches: list[Any], config: CompressConfig,
           target: float) -> tuple[dict[str, tuple], tuple]:
    """The rule's widths times one factor: the smallest whose narrowed model (read-backs
    included, before any fine-tuning) keeps a :class:`Fidelity` of at least ``target`` to the
    original on the calibration data. A bisection in the factor's logarithm; every trial is a
    rewrite and a pass over the calibration data. At the largest factor every group is whole
    (the original, fidelity 1); where nothing narrower reaches ``target``, that is the result,
    with a warning that says what the narrowest trial reached. Returns the decisions,
    ``(factor, fidelity)`` and the fidelity's name."""
    calls = [as_call(batch) for batch in batches]
    fidelity = Fidelity.of(gm, calls)
    rule = _rule_widths(targets, decisions)
    if not rule:
        return dict(decisions), (1.0, 1.0), fidelity.name
    statistics = _read_statistics(gm, plan, decisions, accs, batches) if config.reconstruct else {}
    trial = _Trials(gm, plan, decisions, accs, statistics, config, rule,
                    lambda module: fidelity.measure(module, calls), fidelity.name)
    low, high = trial.bounds
    best = None
    if trial(low)[0] >= target:
        best = low
    else:
        for _ in range(LEVEL_STEPS):
            middle = (low * high) ** 0.5
            if trial(middle)[0] >= target:
                high = best = middle
            else:
                low = middle
    if best is None or trial.whole(best):  # nothing narrower kept the target: the original, and say so
        reached = max([v for key, v in trial.tried.items() if any(k < plan[n].size for n, k in key)] or [0.0])
        warnings.warn(f"compress: no narrowing of this model keeps {fidelity.name} ≥ {target:g} on the calibration "
                      f"data (the widest trial below the original reached {reached:.3f}); every group is kept whole. "
                      f"Lower CompressConfig(agreement=…), fine-tune with fxcompress.rmtkd, or set widths with "
                      f"rule='fixed'", CompressionWarning, stacklevel=3)
        return {name: (None, selection, transform) for name, (_, selection, transform) in decisions.items()}, \
            (max(high, 1.0), 1.0), fidelity.name
    agreement, out = trial(best, again=True)
    return out, (best, agreement), fidelity.name


def _budget(gm: GraphModule, plan: Plan, targets: Sequence[WidthGroup], accs: Mapping[str, Sequence[CovarianceAccumulator]],
            decisions: Mapping[str, tuple], batches: list[Any], config: CompressConfig) -> tuple[dict[str, tuple], tuple]:
    """The rule's widths times the largest factor whose narrowed model keeps at most
    ``config.params`` of the parameters outside embedding tables: a bisection in the factor's
    logarithm, each trial a rewrite (no forward pass). Returns the decisions and ``(factor,
    fraction kept)``; a budget below what the narrowest widths reach is a :class:`ConfigError`."""
    total = outside_embeddings(gm)
    rule = _rule_widths(targets, decisions)
    trial = _Trials(gm, plan, decisions, accs, {}, config, rule, lambda module: outside_embeddings(module) / total,
                    "parameters", counting=True)
    low, high = trial.bounds
    floor = trial(low)[0] if rule else 1.0
    if floor > config.params:
        raise ConfigError(f"CompressConfig(params={config.params:g}) is below the {floor:.3f} of the parameters "
                          f"outside embeddings that every target group at its narrowest keeps: the rest is frozen or "
                          f"not targeted (see the plan); raise params or target more groups")
    for _ in range(LEVEL_STEPS):
        middle = (low * high) ** 0.5
        kept = trial(middle)[0]
        if kept <= config.params:
            low = middle
            if config.params - kept < BUDGET_SLACK:
                break
        else:
            high = middle
    trial.statistics = _read_statistics(gm, plan, decisions, accs, batches) if config.reconstruct else {}
    trial.last, trial.counting = (None, None), False  # the chosen widths, built in earnest
    kept, out = trial(low, again=True)
    return out, (low, kept)


def _rule_widths(targets: Sequence[WidthGroup], decisions: Mapping[str, tuple]) -> dict[str, int]:
    """Each scalable group's width as its rule chose it (the whole group where it kept all)."""
    return {g.name: g.size if decisions[g.name][0] is None else decisions[g.name][0].k
            for g in targets if _scalable(decisions[g.name][1])}


class _Trials:
    """The rule's widths scaled by a factor, rewritten on a structural copy of the capture and
    scored (``score(module)``); one trial per distinct set of widths, of which only the score is
    kept (a wide model's projections take gigabytes), and the decisions of the last. A
    ``counting`` trial, scored by size alone, keeps each block's first channels instead of
    building the projections (the same shapes, at a fraction of the cost).
    ``bounds``: the factors at which every group is 1 wide and every group whole."""

    def __init__(self, gm: GraphModule, plan: Plan, decisions: Mapping[str, tuple], accs: Mapping, statistics: Mapping,
                 config: CompressConfig, rule: Mapping[str, int], score: Callable[[GraphModule], float], what: str,
                 counting: bool = False):
        self.gm, self.plan, self.decisions, self.accs, self.config, self.rule = gm, plan, decisions, accs, config, rule
        self.score, self.what, self.tried, self.last, self.counting = score, what, {}, (None, None), counting
        self.statistics = statistics  # the read-backs' covariances
        self.bounds = (min(1 / k for k in rule.values()), max(plan[name].size / k for name, k in rule.items())) \
            if rule else (1.0, 1.0)

    def widths(self, factor: float) -> dict[str, int]:
        return {name: _scaled(self.plan[name], k, factor, self.config) for name, k in self.rule.items()}

    def whole(self, factor: float) -> bool:
        return all(k >= self.plan[name].size for name, k in self.widths(factor).items())

    def __call__(self, factor: float, again: bool = False) -> tuple[float, dict]:
        widths = self.widths(factor)
        key = tuple(sorted(widths.items()))
        if key not in self.tried or again and self.last[0] != key:
            out = dict(self.decisions)
            for name, k in widths.items():
                _, selection, transform = self.decisions[name]
                out[name] = (self._projection(name, k, transform), selection, transform)
            out = _lifted(out, self.statistics, self.config.fold_mean)
            # rewrite installs new tensors and never writes into the old: a trial, only run, shares the rest
            module = rewrite(copy_module(self.gm, share_weights=True), self.plan,
                             {n: p for n, (p, _, _) in out.items() if p is not None}, inplace=True)
            self.tried[key], self.last = self.score(module), (key, out)
            log.info("widths × %.3f: %s %.3f", factor, self.what, self.tried[key])
        return self.tried[key], self.last[1] if self.last[0] == key else None

    def _projection(self, name: str, k: int, transform: str | None) -> Projection | None:
        group = self.plan[name]
        if k >= group.size:
            return None
        if self.counting:
            return _first_channels(group, k, self.config, transform)
        return _at_width(self.gm, group, self.accs[name], self.config, k)


class CompressionWarning(UserWarning):
    """``compress`` kept the model (or part of it) whole because narrowing it lost too much."""


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How close a narrowed model stays to the original on the calibration data, in (0, 1].

    ``top-1``: the fraction of positions whose top-1 output (the first output's argmax over
    its last axis: logits) is the original's. ``perplexity``, for a language model (logits
    ``(batch, positions, vocabulary)`` over integer ``input_ids`` of ``(batch, positions)``):
    the original's perplexity over the narrowed model's, on the next tokens of the
    calibration text, so 0.8 allows 1.25× the original perplexity. Top-1 over a vocabulary of
    tens of thousands counts a near-tie as a miss and a confident error as a hit; the
    perplexity ratio is what a language model is judged by."""

    name: str
    reference: tuple

    @staticmethod
    def of(gm: GraphModule, calls: list[tuple[tuple, dict]]) -> "Fidelity":
        outputs = [_run(gm, *call) for call in calls]
        if all(_tokens(call, out) is not None for call, out in zip(calls, outputs)):
            losses = [_next_token_loss(out[0], _tokens(call, out)) for call, out in zip(calls, outputs)]
            return Fidelity("perplexity", (torch.stack(losses).sum(dim=0),))
        return Fidelity("top-1 agreement", tuple(_top1(out, "the original") for out in outputs))

    def measure(self, module: GraphModule, calls: list[tuple[tuple, dict]]) -> float:
        if self.name == "perplexity":
            total = torch.stack([_next_token_loss(out[0], _tokens(call, out)) for call in calls
                                 for out in [_run(module, *call)]]).sum(dim=0)
            original, narrowed = self.reference[0][0] / self.reference[0][1], total[0] / total[1]
            value = float(torch.exp(original - narrowed)) if torch.isfinite(narrowed) else 0.0
            return min(value, 1.0)
        hits = [_top1(_run(module, *call), "the narrowed model") == ref for call, ref in zip(calls, self.reference)]
        return float(torch.cat([h.reshape(-1) for h in hits]).float().mean())


def _tokens(call: tuple[tuple, dict], outputs: list[torch.Tensor]) -> tuple[torch.Tensor, Any] | None:
    """``(input_ids, attention_mask)`` where the call is a language model's: integer ids
    ``(batch, positions)`` (the ``input_ids`` keyword, else the only positional input) and a
    first output of logits ``(batch, positions, vocabulary)``; else None."""
    args, kwargs = call
    ids = kwargs.get("input_ids", args[0] if len(args) == 1 else None)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64) or ids.ndim != 2 \
            or not outputs or outputs[0].ndim != 3 or tuple(outputs[0].shape[:2]) != tuple(ids.shape) \
            or ids.shape[1] < 2 or int(ids.max()) >= outputs[0].shape[-1]:
        return None
    return ids, kwargs.get("attention_mask")


def _next_token_loss(logits: torch.Tensor, tokens: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """``(summed cross-entropy of each next token, count)`` over the positions the mask keeps."""
    ids, mask = tokens
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].double().transpose(1, 2), ids[:, 1:], reduction="none")
    keep = torch.ones_like(loss, dtype=torch.bool) if not isinstance(mask, torch.Tensor) else \
        (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    return torch.stack([loss[keep].sum(), keep.sum().double()])


def _scalable(selection: RankSelection | None) -> bool:
    """Whether a group's width takes part in the level: not where there was no spectrum, nor
    where an MP rule had too few eigenvalues to fit a noise bulk (it kept every direction, and
    says so in the report; a level would narrow it on no evidence)."""
    return selection is not None and not (selection.rule in MP_RULES and selection.sigma2 is None)


BUDGET_SLACK = 0.002  # a size budget's bisection stops within this fraction of the parameters under it
LEVEL_STEPS = 10  # bisection steps of the agreement level: the factor to within (largest range)^(1/1024)


def _first_channels(group: WidthGroup, k: int, config: CompressConfig, transform: str | None) -> Projection:
    """A stand-in of the right shapes: the first ``k / blocks`` channels of each block, made
    dense where the group rotates (a rotated norm scale becomes a ``k × k`` matrix), with a mean
    to fold where ``config`` folds one (the biases it adds count)."""
    per_block = k // group.blocks
    select = Projection.select([b * group.block_size + i for b in range(group.blocks) for i in range(per_block)],
                               group.size)
    dense = torch.block_diag(*[torch.full((per_block, group.block_size), 1e-3, dtype=torch.float64)] * group.blocks)
    matrix = select.matrix if transform in ("selection", "magnitude") else select.matrix + dense
    return Projection(matrix, torch.zeros(group.size, dtype=torch.float64) if config.fold_mean else None)


def _scaled(group: WidthGroup, k: int, factor: float, config: CompressConfig) -> int:
    """``k`` times ``factor``, per block: rounded up to ``round_to``, within [``min_rank``, block]."""
    per_block = k // group.blocks
    width = config.round_to * int(np.ceil(factor * per_block / config.round_to - 1e-9))
    return group.blocks * min(max(width, config.min_rank, 1), group.block_size)


def _top1(outputs: list[torch.Tensor], what: str) -> torch.Tensor:
    """The top-1 index along the last axis of the first output (its logits)."""
    if not outputs or outputs[0].ndim < 1 or outputs[0].shape[-1] < 2:
        shape = tuple(outputs[0].shape) if outputs else "none"
        raise ConfigError(f"CompressConfig.agreement compares top-1 outputs, but {what}'s first output has shape "
                          f"{shape}: it needs scores over two or more classes along the last axis (logits); "
                          "choose the outputs with CompressConfig(outputs=...), or pass agreement=None for the "
                          "rule's own widths")
    return outputs[0].argmax(dim=-1)


def _pooled_reads(gm: GraphModule, group: WidthGroup) -> list[tuple[str, int]] | None:
    """Where a group's spectrum is pooled from every activation its consumers read: a group
    with a normalisation in it (a transformer's residual stream, read by each layer through
    its own norm), read at more than one place. Its probe alone (the first layer's input)
    would choose directions for every later layer from the first one's statistics."""
    if "normalizing" not in group.effects or group.blocks != 1 or group.routing:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    points = list(dict.fromkeys(_before_scale(nodes[name], axis) for name, axis in _read_points(gm, group)))
    return points if len(points) > 1 else None


def _before_scale(node: torch.fx.Node, axis: int) -> tuple[str, int]:
    """A read through a normalisation's own scale that stays in the graph (a tied head's, which
    the rewrite turns into a ``k × k`` product) is measured before that scale, where the
    rotation acts: ``w ⊙ n(x)`` leaves the span of the stream that ``n(x)`` stays in."""
    at = node
    while at.target == torch.ops.aten.slice.Tensor and isinstance(at.args[0], torch.fx.Node):
        at = at.args[0]  # the positions a head reads: the same channels
    scale = norm_scale(at)
    if scale is None or at.target != torch.ops.aten.mul.Tensor:
        return node.name, axis
    return next(a for a in at.args if a is not scale).name, axis


def _read_points(gm: GraphModule, group: WidthGroup) -> list[tuple[str, int]]:
    """The activations ``(node, axis)`` of the group that its plain consumers read whole (the
    node holds the group along one axis only, at the group's width)."""
    axes: dict[str, list[int]] = {}
    for node, axis in group.activations:
        axes.setdefault(node, []).append(axis)
    nodes = {n.name: n for n in gm.graph.nodes}
    points = []
    for use in group.consumers:
        for read in nodes[use.node].all_input_nodes if plain(use) and use.node in nodes else ():
            shape = getattr(read.meta.get("val"), "shape", None)
            axis = axes.get(read.name, [None])
            if len(axis) == 1 and axis[0] is not None and shape is not None and len(shape) > axis[0] \
                    and shape[axis[0]] == group.size and (read.name, axis[0]) not in points:
                points.append((read.name, axis[0]))
    return points


def reconstruction(acc: CovarianceAccumulator, selection: torch.Tensor, centered: bool = True) -> torch.Tensor | None:
    """The least-squares read-back ``L = Σ Sᵀ (S Σ Sᵀ)⁻¹`` of a channel selection ``S``, from the
    calibration statistics: each dropped channel is predicted from the kept ones, so the
    consumers that read the kept channels absorb the rest. ``Σ`` is the covariance where the
    mean is folded (the prediction is about it), else the second moment ``E[xxᵀ]`` (a
    prediction without an intercept). None with fewer than two samples per channel, where the
    cross moments are too noisy to predict anything (the consumers then read ``Sᵀ``)."""
    if acc.dof() < 2 * acc.dim:
        return None
    cov = acc.covariance(centered)
    keep = selection.argmax(dim=1).numpy()
    cross = cov[:, keep]  # d × k
    inner = cross[keep] + np.eye(len(keep)) * (1e-9 * max(float(np.trace(cross[keep])), 1e-300) / len(keep))
    try:
        lift = scipy.linalg.solve(inner, cross.T, assume_a="pos").T
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        lift = np.linalg.lstsq(inner, cross.T, rcond=None)[0].T
    lift[keep] = np.eye(len(keep))  # the kept channels are read as they are
    return torch.from_numpy(np.ascontiguousarray(lift))


def _uniform(gm: GraphModule, targets: Sequence[WidthGroup], accs: Mapping[str, Sequence[CovarianceAccumulator]],
             decisions: Mapping[str, tuple], config: CompressConfig) -> dict[str, tuple]:
    """Each kind of group at the largest width any of its groups chose; a group that chose less
    is narrowed again to that width (its rule's selection is kept for the report)."""
    kinds: dict[tuple, list[WidthGroup]] = {}
    for group in targets:
        if decisions[group.name][1] is not None:  # a group with no spectrum stays as it is
            kinds.setdefault((re.sub(r"\.\d+(?=\.|$)", ".*", group.name), group.size, group.blocks), []).append(group)
    out = dict(decisions)
    for groups in kinds.values():
        width = max(g.size if decisions[g.name][0] is None else decisions[g.name][0].k for g in groups)
        for group in groups:
            proj, selection, transform = decisions[group.name]
            if width >= group.size:
                out[group.name] = (None, selection, transform)
            elif proj.k != width:
                out[group.name] = (_at_width(gm, group, accs[group.name], config, width), selection, transform)
    return out


def _at_width(gm: GraphModule, group: WidthGroup, accs: Sequence[CovarianceAccumulator], config: CompressConfig,
              width: int) -> Projection:
    """The group's projection at ``width``, built as ``config`` builds it (transform, mean)."""
    fixed = dataclasses.replace(config, rule="fixed", widths={group.name: width}, ratio=None, k=None, agreement=None,
                                params=None)
    return _decide(gm, group, accs, fixed)[0]


def _null(accs: Sequence[CovarianceAccumulator], rule: str) -> dict[str, Any]:
    """The effective sample size the circular-shift null implies, for the MP rules (which use
    it) when kept: one fit, pooled over a group's heads (a single null without heads)."""
    if rule not in MP_RULES or accs[0].null is None:
        return {}
    nulls = [acc.null.correlation_eigenvalues() for acc in accs]
    return {"n_effective": pooled_effective_samples(nulls, accs[0].dof())}


def _block(acc: CovarianceAccumulator, values: np.ndarray, k: int, transform: str,
           norms: torch.Tensor | None, centered: bool = True) -> torch.Tensor:
    """The ``k × d`` projection of one block, as ``transform`` builds it."""
    d = acc.dim
    if transform == "magnitude":
        return Projection.select(np.sort(torch.topk(norms, k).indices.numpy()), d).matrix
    top = _complete(acc.leading_eigenvectors(k, centered), k)
    if transform == "selection":
        weighted = top * np.sqrt(np.clip(values[:k], 0, None))
        _, pivots = scipy.linalg.qr(weighted.T, pivoting=True, mode="r")
        return Projection.select(np.sort(pivots[:k]), d).matrix
    return torch.from_numpy(top.T.copy(order="C"))  # a copy: a one-row view may keep negative strides


def _weight_norms(gm: GraphModule, group: WidthGroup) -> torch.Tensor:
    """Per channel, the squared L2 norm of the producer weights (consumer weights, if none)
    over all the group's parameters: the magnitude-pruning score."""
    score = torch.zeros(group.size, dtype=torch.float64)
    for use in group.producers or [u for u in group.consumers if u.block_axis is None]:
        weight = operator.attrgetter(use.param)(gm).detach().to(torch.float64)
        if group.routing:  # expert by expert: (experts, width, …)
            rows = torch.movedim(weight, (use.block_axis, use.axis), (0, 1))
            rows = rows if use.length is None else rows[:, use.offset:use.offset + use.length]
            score += (rows.reshape(*rows.shape[:2], -1) ** 2).sum(dim=2).reshape(-1)
            continue
        rows = torch.movedim(weight, use.axis, 0)
        if use.length is not None:  # a packed projection's slice
            rows = rows[use.offset:use.offset + use.length]
        if use.block is not None:  # the slice holds one block (head) of the group
            start = use.block * group.block_size
            score[start:start + group.block_size] += (rows.reshape(group.block_size, -1) ** 2).sum(dim=1)
            continue
        # an axis that repeats each block (grouped-query attention's query side) scores it as often
        score += (rows.reshape(group.blocks, use.repeat, group.block_size, -1) ** 2).sum(dim=(1, 3)).reshape(-1)
    return score


def _complete(vectors: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` columns of an orthonormal basis that starts with ``vectors``.

    With fewer samples than features only ``n - 1`` directions carry variance; a rule that
    asks for more (``fixed``) gets the rest from their orthogonal complement.
    """
    if k <= vectors.shape[1]:
        return vectors[:, :k]
    extra = np.random.default_rng(0).standard_normal((vectors.shape[0], k - vectors.shape[1]))
    basis, _ = np.linalg.qr(np.hstack([vectors, extra]))  # reduced QR: d × k
    signs = np.sign(np.sum(basis[:, : vectors.shape[1]] * vectors, axis=0))  # QR may flip given columns
    basis[:, : vectors.shape[1]] *= np.where(signs == 0, 1.0, signs)
    return basis[:, :k]


def _transform(group: WidthGroup, config: CompressConfig) -> str:
    if config.transform != "auto":
        return config.transform
    return "selection" if group.exact == ("selection",) else "projection"


def _report(group: WidthGroup, decision) -> GroupReport:
    if decision is None:
        reason = group.frozen_by or (("no consumer to probe",) if group.probe is None else
                                     ("one channel per block: nothing to narrow",) if group.block_size < 2 else ("not targeted",))
        return GroupReport(group.name, group.size, group.size, None, None, None, None, None, True, reason)
    proj, sel, transform = decision
    if sel is None:
        return GroupReport(group.name, group.size, group.size, None, None, None, None, None, True, (transform,))
    k = group.size if proj is None else proj.k
    exact = proj is None or transform in group.exact
    return GroupReport(group.name, group.size, k, sel.rule, sel.sigma2, sel.lambda_plus, sel.n_signal,
                       transform, exact, (), sel.diagnostics.warnings)


def num_parameters(module: torch.nn.Module) -> int:
    """Elements of every parameter of ``module``."""
    return sum(p.numel() for p in module.parameters())


def outside_embeddings(gm: GraphModule) -> int:
    """Elements of the parameters of captured ``gm`` that no embedding lookup reads (a tied
    language-model head is its embedding table): what LLM compression is measured by."""
    names = dict(gm.named_parameters(remove_duplicate=False))  # a tied table under either name
    tables = {id(names[n.args[0].target]) for n in gm.graph.nodes if n.target == torch.ops.aten.embedding.default
              and n.args[0].op == "get_attr" and n.args[0].target in names}
    return sum(p.numel() for p in gm.parameters() if id(p) not in tables)
