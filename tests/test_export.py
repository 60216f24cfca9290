"""ONNX export: the zoo, original and compressed, exports and validates; tampering is caught."""

import onnx
import pytest
import torch
from onnx import numpy_helper

import fxcompress
from fxcompress import CompressConfig
from fxcompress.errors import ConfigError, ExportError
from fxcompress.bench import FLOPS_KEY, size_on_disk
from fxcompress.export import export_onnx, validate_onnx
from zoo import ORACLES

EXPORTABLE = sorted(ORACLES)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_zoo_exports_and_validates_original_and_compressed(name, tmp_path):
    cls, inputs = ORACLES[name]
    torch.manual_seed(0)
    model = cls().eval()
    data = [inputs(8) for _ in range(2)]
    compressed = fxcompress.compress(model, data, CompressConfig(rule="fixed", ratio=0.5, round_to=1)).module
    for tag, module in (("original", model), ("compressed", compressed)):
        report = export_onnx(module, data[0], tmp_path / f"{tag}.onnx")
        assert report.exporter == "dynamo" and len(report.checked_shapes) == 3 and report.max_error <= 1e-4
        batches = [next(iter(s.values()))[0] for s in report.checked_shapes]
        assert batches == [8, 1, 10]  # the batch axis stayed dynamic
        assert report.size_bytes == size_on_disk(tmp_path / f"{tag}.onnx") > 0
        meta = {p.key: p.value for p in onnx.load(report.path).metadata_props}
        assert float(meta[FLOPS_KEY]) > 0


def test_an_altered_initializer_fails_validation(tmp_path):
    cls, inputs = ORACLES["residual_mlp"]
    model = cls().eval()
    x = inputs(4)
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path)
    proto = onnx.load(str(path))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.05, weight.name))
    onnx.save(proto, str(path))
    with pytest.raises(ExportError, match=r"output .* differs from PyTorch .* largest error"):
        validate_onnx(model, x, path)


def test_export_errors_are_clear_and_write_nothing(tmp_path):
    cls, inputs = ORACLES["residual_mlp"]
    with pytest.raises(ConfigError, match="exporter must be one of"):
        export_onnx(cls(), inputs(2), tmp_path / "a.onnx", exporter="tflite")
    with pytest.raises(ConfigError, match="needs an nn.Module"):
        export_onnx("model.pt", inputs(2), tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="export failed"):
        export_onnx(cls(), torch.zeros(2, 3, 5), tmp_path / "a.onnx")  # wrong input width
    assert not list(tmp_path.iterdir())
