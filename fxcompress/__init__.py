"""fxcompress: spectral (RMT-KD) compression of neural networks as a torch.fx model-surgery pass.

The pipeline, one module per stage:

* :mod:`fxcompress.capture` — any model → one ATen-level ``torch.fx`` graph;
* :mod:`fxcompress.analysis` — width propagation: the groups of coupled dimensions (pure);
* :mod:`fxcompress.calibrate` — one pass over calibration data → a covariance per group;
* :mod:`fxcompress.spectral` — covariance of hidden activations, Marchenko–Pastur noise
  bulk, and the rules that choose how many directions a layer keeps;
* :mod:`fxcompress.rewrite` — apply a projection per group, narrowing every coupled op;
* :mod:`fxcompress.compress` — all of the above in one call;
* :mod:`fxcompress.saved` — ``result.save(dir)`` / :func:`fxcompress.load`: safetensors, JSON
  and a ``torch.export`` program, never pickle;
* :mod:`fxcompress.surgery` — the narrowed widths on the user's own class (``result.to_module()``);
* :mod:`fxcompress.distill` — fine-tuning with the RMT-KD distillation loss;
* :mod:`fxcompress.rmtkd` — the iterative loop: project, distil, repeat, with checkpoints;
* :mod:`fxcompress.export` — validated ONNX export; :mod:`fxcompress.bench` and
  :mod:`fxcompress.results` — side-by-side deployment benchmarks (``fxcompress-bench``).

Every error raised on purpose derives from :class:`FxCompressError`.
"""

from fxcompress import calibrate
from fxcompress.analysis import Plan, WidthGroup, analyze, analyze_graph
from fxcompress.capture import capture
from fxcompress.compress import CompressConfig, CompressionWarning, CompressResult, compress, rebuild
from fxcompress.distill import DistillConfig, DistillResult, accuracy, distill, kd_loss
from fxcompress.errors import (CaptureError, ConfigError, DataError, DatasetError, ExportError, FxCompressError,
                               SurgeryError, TrainingError)
from fxcompress.export import ExportReport, export_onnx, validate_onnx
from fxcompress.rewrite import Projection, RewriteError, exact_transforms, fold_batch_norms, rewrite
from fxcompress.rmtkd import RMTKDConfig, RMTKDResult, Round, rmtkd
from fxcompress.saved import load
from fxcompress.spectral import CovarianceAccumulator, RankSelection, select_rank

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CompressConfig", "CompressionWarning", "CompressResult", "ConfigError", "CovarianceAccumulator", "DataError",
    "DatasetError", "DistillConfig", "DistillResult", "ExportError", "ExportReport", "FxCompressError", "Plan",
    "Projection", "RMTKDConfig", "RMTKDResult", "RankSelection", "RewriteError", "Round", "SurgeryError", "TrainingError",
    "WidthGroup", "accuracy", "analyze", "analyze_graph", "calibrate", "capture", "compress", "distill",
    "exact_transforms", "export_onnx", "fold_batch_norms", "kd_loss", "load", "rebuild", "rewrite", "rmtkd", "select_rank", "validate_onnx",
]
