"""Side-by-side deployment benchmarks of ONNX models (what ``fxcompress-bench`` runs).

The protocol (DESIGN.md §5): each measurement runs in a fresh process, models alternate
A B A B over the repeats so drift hits all of them, warm-up (≥ 10 runs and ≥ 2 s) comes
before ≥ 1,000 timed runs and ≥ 10 s. Per model and batch size: latency (mean, std,
p50/p90/p95/p99), throughput, peak RSS, energy and average power with their source —
NVML's total-energy counter on a GPU (idle power measured beside it), RAPL on a CPU where
readable, otherwise ``null`` with the reason, never an estimate. Ratios to the first model
come with their spread across repeats, and the FLOP ratio sits beside the latency ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fxcompress.errors import ConfigError, DataError
from fxcompress.validate import check_fields

DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
RAPL = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
FLOPS_KEY = "fxcompress.flops_per_sample"  # written by fxcompress.export_onnx


def _cifar10_test(root: str | None) -> tuple[np.ndarray, np.ndarray]:
    from fxcompress.datasets import cifar10

    return cifar10(root, ["test_batch_first1000"])


#: Labelled evaluation splits: name → loader(data_dir) returning (inputs, labels).
DATASETS = {"cifar10": _cifar10_test}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to measure. Defaults follow DESIGN.md §5; tests shorten them."""

    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int = 3
    device: str = "cpu"
    warmup_runs: int = 10
    warmup_seconds: float = 2.0
    min_runs: int = 1000
    min_seconds: float = 10.0
    max_seconds: float = 60.0  # a cap for slow models: fewer than min_runs then (the count is reported)
    threads: int = 0  # intra-op threads; 0 lets ONNX Runtime choose
    sequence_length: int = 128  # for symbolic non-batch axes (token inputs)
    seed: int = 0
    dataset: str | None = None  # a labelled split for accuracy (see DATASETS)
    data_dir: str | None = None  # default: $FXCOMPRESS_DATA

    def __post_init__(self):
        check_fields(self)
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be integers ≥ 1, got {list(self.batch_sizes)}")
        if self.repeats < 1 or self.min_runs < 1 or self.warmup_runs < 0:
            raise ConfigError("repeats and min_runs must be ≥ 1, warmup_runs ≥ 0")
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {self.dataset!r}: choose one of {sorted(DATASETS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}: choose one of {sorted(DEVICES)}")
        if self.max_seconds < self.min_seconds:
            raise ConfigError(f"max_seconds ({self.max_seconds}) must be ≥ min_seconds ({self.min_seconds})")
        if self.sequence_length < 1 or self.threads < 0:
            raise ConfigError("sequence_length must be ≥ 1 and threads ≥ 0")


# -- what a model is ------------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """The ONNX graph of ``path`` (without external weights), or a clear error. The external
    data files it names must lie beside it, inside its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such model file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 — protobuf raises several types
        raise DataError(f"{path} is not an ONNX model ({type(exc).__name__}): pass .onnx files "
                        "(fxcompress.export_onnx writes them)") from None
    for name in external_files(model):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{path} names external data {name!r} outside its own folder: refusing to read it")
        if not (path.parent / name).is_file():
            raise DataError(f"{path} keeps its weights in {path.parent / name}, which is missing: "
                            "copy the data file beside the model")
    return model


def external_files(model: onnx.ModelProto) -> set[str]:
    """The external data files (relative locations) that ``model``'s initializers name."""
    return {entry.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data if entry.key == "location"}


def to_onnx(path: str | os.PathLike, folder: str | os.PathLike, *, trust_pt2: bool = False,
            name: str | None = None) -> Path:
    """``path`` itself if it is ONNX; a PyTorch program saved with ``torch.export.save``
    (``.pt2``) is exported to ``folder/<name>.onnx`` first with :func:`fxcompress.export_onnx`
    (validated). An archive holding anything ``torch.export.load`` would unpickle is
    refused (:func:`fxcompress.saved.check_archive`) unless ``trust_pt2=True``."""
    path = Path(path)
    if path.suffix != ".pt2":
        return path
    from fxcompress.capture import capture
    from fxcompress.export import export_onnx
    from fxcompress.saved import load_program

    program = load_program(path, trust=trust_pt2, remedy="pass --trust-pt2 (trust_pt2=True) only for a file you "
                                                         "made yourself, or export the model to ONNX with "
                                                         "fxcompress.export_onnx")
    if program.example_inputs is None:
        raise DataError(f"{path} holds no example inputs: export it with example inputs and save it again")
    args, kwargs = program.example_inputs
    target = Path(folder) / f"{name or path.stem}.onnx"
    export_onnx(capture(program), kwargs if kwargs else args, target)
    return target


def signature(model: onnx.ModelProto) -> list[dict[str, Any]]:
    """The graph inputs (not initializers): name, element type, and dims (str when symbolic)."""
    weights = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
        out.append({"name": value.name, "type": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
                    "dims": dims})
    return out


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Static facts: parameters, size on disk, FLOPs per sample (from export metadata)."""
    model = load_model(path)
    meta = {p.key: p.value for p in model.metadata_props}
    flops = float(meta[FLOPS_KEY]) if FLOPS_KEY in meta else None
    return {"path": str(path), "name": Path(path).stem, "parameters": count_parameters(model),
            "size_bytes": size_on_disk(path), "flops_per_sample": flops,
            "flops_source": "torch FlopCounterMode at export" if flops is not None else
            None, "flops_missing_reason": None if flops is not None else
            "the file was not written by fxcompress.export_onnx, which records FLOPs in its metadata",
            "signature": signature(model)}


def check_same_inputs(models: list[dict[str, Any]]) -> None:
    """Every model must take the same inputs (names, element types, fixed dims; symbolic
    dims, as ``?``, may carry other names)."""
    def key(m):
        return [(s["name"], s["type"], [d if isinstance(d, int) else "?" for d in s["dims"]]) for s in m["signature"]]
    first = key(models[0])
    for m in models[1:]:
        if key(m) != first:
            raise DataError(f"{m['path']} takes inputs {key(m)} but {models[0]['path']} takes {first}: "
                            "compare models with the same input signature")


def make_inputs(sig: list[dict[str, Any]], batch: int, sequence: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs: axis 0 is the batch, other symbolic axes the sequence length; integer
    inputs get small ids (valid for any vocabulary) and masks get ones."""
    rng = np.random.default_rng(seed)
    feed = {}
    for s in sig:
        shape = [batch if i == 0 else (d if isinstance(d, int) else sequence) for i, d in enumerate(s["dims"])]
        dtype = np.dtype(s["type"])
        if dtype.kind == "f":
            feed[s["name"]] = rng.standard_normal(shape).astype(dtype)
        elif "mask" in s["name"]:
            feed[s["name"]] = np.ones(shape, dtype=dtype)
        else:
            feed[s["name"]] = rng.integers(0, 2, shape).astype(dtype)
    return feed


def size_on_disk(path: str | os.PathLike) -> int:
    """Bytes of an ``.onnx`` file plus the external data files it references."""
    path = Path(path)
    files = external_files(onnx.load(str(path), load_external_data=False))
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers (the weights)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats))


# -- one measurement (in a fresh process) -----------------------------------------------------
def measure(path: str, batch: int, config: BenchConfig) -> dict[str, Any]:
    """Latency, throughput, memory, energy of one model at one batch size, in this process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if config.threads:
        options.intra_op_num_threads = config.threads
    wanted = DEVICES[config.device]
    if wanted not in ort.get_available_providers():
        raise ConfigError(f"{wanted} is not available in this onnxruntime build ({ort.get_available_providers()}); "
                          "install fxcompress[gpu] (onnxruntime-gpu, never beside onnxruntime)")
    session = ort.InferenceSession(path, options, providers=[wanted])
    if session.get_providers()[0] != wanted:
        raise ConfigError(f"ONNX Runtime fell back to {session.get_providers()[0]} instead of {wanted}")
    feed = make_inputs(signature(load_model(path)), batch, config.sequence_length, config.seed)
    run = _runner(session, feed, config.device)
    _loop(run, config.warmup_runs, config.warmup_seconds, config.max_seconds)
    meter = EnergyMeter(config.device)
    meter.start()
    times = _loop(run, config.min_runs, config.min_seconds, config.max_seconds)
    energy = meter.stop(len(times))
    total = float(sum(times))
    ms = np.asarray(times) * 1e3
    return {
        "batch": batch, "provider": session.get_providers()[0], "threads": config.threads or "ort-default",
        "graph_optimization": "ORT_ENABLE_ALL",
        "latency_ms": {"count": len(times), "mean": float(ms.mean()), "std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
                       **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}},
        "throughput_per_s": batch * len(times) / total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_memory_bytes": meter.gpu_memory(),
        "energy": energy,
        "samples_ms": ms[:: max(1, len(ms) // 2000)].round(4).tolist(),  # for the distribution plots
    }


def _runner(session, feed: dict[str, np.ndarray], device: str):
    if device != "cuda":
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def _loop(run, min_runs: int, min_seconds: float, max_seconds: float) -> list[float]:
    """At least ``min_runs`` runs and ``min_seconds``, unless ``max_seconds`` pass first (≥ 2 runs)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_seconds:
        if len(times) >= 2 and time.perf_counter() - start >= max_seconds:
            break
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


class EnergyMeter:
    """Energy over a window: NVML on a GPU, RAPL on a CPU, or null with the reason."""

    def __init__(self, device: str):
        self.device, self.handle, self.reason = device, None, None
        if device == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            except Exception as exc:  # noqa: BLE001
                self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
        elif not os.access(RAPL, os.R_OK):
            self.reason = f"RAPL is not readable here ({RAPL} missing or not permitted); no CPU energy counter"

    def start(self) -> None:
        self.idle_w = self._idle_power() if self.handle is not None else None
        self.t0, self.e0 = time.perf_counter(), self._read()

    def stop(self, inferences: int) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        if self.reason is not None:
            return {"source": None, "reason": self.reason, "joules": None, "avg_power_w": None,
                    "joules_per_inference": None}
        joules = self._read() - self.e0
        source = "nvml" if self.handle is not None else "rapl"
        out = {"source": source, "reason": None, "window_s": seconds, "joules": joules, "avg_power_w": joules / seconds,
               "joules_per_inference": joules / inferences}
        if source == "nvml":
            out["idle_power_w"] = self.idle_w
            out["net_joules_per_inference"] = (joules - self.idle_w * seconds) / inferences
            if seconds < 10:
                out["note"] = "window under 10 s: the NVML counter updates about every 100 ms"
        return out

    def gpu_memory(self) -> int | None:
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) if self.handle is not None else None

    def _read(self) -> float:
        if self.reason is not None:
            return 0.0
        if self.handle is not None:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ → J
        return int(RAPL.read_text()) / 1e6  # µJ → J (wrap-around ignored: windows are short)

    def _idle_power(self, seconds: float = 1.0) -> float:
        samples = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            samples.append(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3)
            time.sleep(0.1)
        return float(statistics.median(samples))


# -- the comparison ----------------------------------------------------------------------------
def compare(paths: list[str], config: BenchConfig = BenchConfig(), progress=print) -> dict[str, Any]:
    """Measure every model at every batch size, alternating models, in fresh processes."""
    if len(paths) < 2:
        raise ConfigError("compare needs two or more models (the first is the reference)")
    models = [describe(p) for p in paths]
    check_same_inputs(models)
    data = DATASETS[config.dataset](config.data_dir) if config.dataset else None
    if data is not None:
        _check_fits(models[0]["path"], models[0]["signature"], data[0])
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    total, start = config.repeats * len(config.batch_sizes) * len(models), time.perf_counter()
    for repeat in range(config.repeats):
        for batch in config.batch_sizes:
            for index, model in enumerate(models):
                done = sum(map(len, runs.values()))
                progress(f"[{done + 1}/{total}] repeat {repeat + 1}/{config.repeats}, batch {batch}: {model['name']}"
                         f"{_eta(done, total, time.perf_counter() - start)}")
                runs.setdefault((index, batch), []).append(_in_fresh_process(model["path"], batch, config))
    results = {"config": dataclasses.asdict(config), "environment": environment(config.device), "models": []}
    for index, model in enumerate(models):
        entry = {k: v for k, v in model.items() if k != "signature"} | {"inputs": model["signature"], "batches": {}}
        if data is not None:
            progress(f"accuracy on {config.dataset}: {model['name']}")
            entry["accuracy"] = {"dataset": config.dataset, "samples": len(data[1]),
                                 "value": accuracy(model["path"], *data, model["signature"])}
        for batch in config.batch_sizes:
            entry["batches"][str(batch)] = _summary(runs[(index, batch)], runs[(0, batch)], model, models[0])
        results["models"].append(entry)
    return results


def _eta(done: int, total: int, elapsed: float) -> str:
    """``", about 2 min 10 s left"`` from the pace so far (nothing before the first measurement)."""
    if not done:
        return ""
    left = round(elapsed / done * (total - done))
    return f", about {left // 60} min {left % 60} s left" if left >= 60 else f", about {left} s left"


def accuracy(path: str, inputs: np.ndarray, labels: np.ndarray, sig: list[dict[str, Any]], batch: int = 100) -> float:
    """Top-1 accuracy of an ONNX classifier (first output, classes last) on CPU."""
    import onnxruntime as ort

    _check_fits(path, sig, inputs)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    correct = 0
    for start in range(0, len(labels), batch):
        logits = session.run(None, {sig[0]["name"]: inputs[start:start + batch]})[0]
        correct += int((logits.argmax(axis=-1) == labels[start:start + batch]).sum())
    return correct / len(labels)


def _check_fits(path: str, sig: list[dict[str, Any]], inputs: np.ndarray) -> None:
    fixed = sig[0]["dims"][1:] if len(sig) == 1 else []
    if len(sig) != 1 or np.dtype(sig[0]["type"]).kind != "f" or len(sig[0]["dims"]) != inputs.ndim or \
            any(isinstance(d, int) and d != n for d, n in zip(fixed, inputs.shape[1:])):
        raise DataError(f"{path} takes inputs {sig}; the dataset gives one float array shaped "
                        f"{['N', *inputs.shape[1:]]}")


def _in_fresh_process(path: str, batch: int, config: BenchConfig) -> dict[str, Any]:
    """:func:`measure` in a child interpreter that imports this very package: ``-P`` keeps the
    working directory off ``sys.path`` (a ``./fxcompress`` folder there must not stand in)."""
    request = json.dumps({"path": path, "batch": batch, "config": dataclasses.asdict(config)})
    proc = subprocess.run([sys.executable, "-P", "-c", _WORKER, str(PACKAGE_ROOT), request],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["it printed nothing"])[-1]
        raise DataError(f"measuring {path} at batch {batch} failed (exit code {proc.returncode}): {tail}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise DataError(f"measuring {path} at batch {batch} printed no result, only {lines[-1][:200]!r}") from None


PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_WORKER = "import sys; sys.path.insert(0, sys.argv[1]); from fxcompress.bench import work; work(sys.argv[2])"


def work(request: str) -> None:
    """The child's side: one measurement, JSON on the last line of stdout."""
    request = json.loads(request)
    cfg = request["config"]
    cfg["batch_sizes"] = tuple(cfg["batch_sizes"])
    print(json.dumps(measure(request["path"], request["batch"], BenchConfig(**cfg))))


def _summary(mine: list[dict], reference: list[dict], model: dict, ref_model: dict) -> dict[str, Any]:
    """Medians across repeats with their (min, max), and ratios to the reference, per repeat."""
    def spread(values):
        values = [v for v in values if v is not None]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None

    out = {"repeats": len(mine), "provider": mine[0]["provider"], "threads": mine[0]["threads"],
           "latency_ms": {k: spread([r["latency_ms"][k] for r in mine]) for k in mine[0]["latency_ms"]},
           "throughput_per_s": spread([r["throughput_per_s"] for r in mine]),
           "peak_rss_bytes": spread([r["peak_rss_bytes"] for r in mine]),
           "gpu_memory_bytes": spread([r["gpu_memory_bytes"] for r in mine]),
           "energy": mine[0]["energy"] if mine[0]["energy"]["source"] is None else
           {k: spread([r["energy"].get(k) for r in mine]) if isinstance(mine[0]["energy"].get(k), float) else
            mine[0]["energy"].get(k) for k in mine[0]["energy"]},
           "samples_ms": [r["samples_ms"] for r in mine]}
    out["ratio_to_first"] = {
        "latency_p50": spread([a["latency_ms"]["p50"] / b["latency_ms"]["p50"] for a, b in zip(mine, reference)]),
        "throughput": spread([a["throughput_per_s"] / b["throughput_per_s"] for a, b in zip(mine, reference)]),
        "parameters": model["parameters"] / ref_model["parameters"],
        "size": model["size_bytes"] / ref_model["size_bytes"],
        "flops": (model["flops_per_sample"] / ref_model["flops_per_sample"]
                  if model["flops_per_sample"] and ref_model["flops_per_sample"] else None),
        "energy_per_inference": spread([a["energy"]["joules_per_inference"] / b["energy"]["joules_per_inference"]
                                        for a, b in zip(mine, reference) if a["energy"]["joules_per_inference"]]),
    }
    return out


def environment(device: str) -> dict[str, Any]:
    """Package versions, CPU, GPU: what a reader needs to compare figures across machines."""
    packages = {}
    for name in ("fxcompress", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "nvidia-ml-py"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or None)
    env = {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
           "cpu": cpu, "cores": os.cpu_count(), "device": device, "gpu": None}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        env["gpu"] = {"name": pynvml.nvmlDeviceGetName(handle), "driver": pynvml.nvmlSystemGetDriverVersion()}
    except Exception as exc:  # noqa: BLE001
        env["gpu_reason"] = f"no GPU visible to NVML ({type(exc).__name__})"
    return env


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
