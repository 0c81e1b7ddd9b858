"""Shared grids along edges, quantized residual adds, and the exact QDQ rewrites onnxruntime fuses."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from cetopt.deploy import ActivationRanges, calibrate_activations, export_onnx, runtime
from tests.deploy.conftest import quantize_all

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout)) if stride > 1 else None
        )

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """Stem (conv, BN, ReLU, max-pool), an identity block, a downsampling block, GAP, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, 1, 1, bias=False), _bn(8), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1, self.layer2 = _Block(8, 8, 1), _Block(8, 16, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyMobile(nn.Module):
    """Inverted residuals: 1×1 expand + ReLU6, depthwise 3×3 + ReLU6, 1×1 project, + x."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), _bn(8), nn.ReLU6(inplace=True))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(8, 16, 1, bias=False),
                _bn(16),
                nn.ReLU6(inplace=True),
                nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
                _bn(16),
                nn.ReLU6(inplace=True),
                nn.Conv2d(16, 8, 1, bias=False),
                _bn(8),
            )
            for _ in range(2)
        )
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _case(cls, scale: float = 1.0):
    torch.manual_seed(0)
    model = cls().eval()
    x = scale * torch.randn(16, 3, 12, 12)
    q = quantize_all(model, 8)
    return q, x, calibrate_activations(q, [x])


def _optimized_ops(path, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def _run(path, x, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input0": x.numpy()})[0]


def test_resnet_export_runs_every_op_on_int8_codes(tmp_path):
    q, x, ranges = _case(TinyResNet)
    result = export_onnx(q, tmp_path / "m.onnx", x[:4], activations=ranges)
    assert result.max_abs_diff <= result.tolerance
    ops = _optimized_ops(result.path, tmp_path)
    assert len(result.quantized_layers) == 7  # 6 convolutions and the Linear
    assert ops["QLinearConv"] == 6
    assert ops["QLinearAdd"] == 2 and ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1
    # one QuantizeLinear at the input, one DequantizeLinear at the output: nothing runs in float
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    assert not {"Conv", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Gemm", "MatMul"} & set(ops)
    # the per-layer grids of before: a requantization and float ops on every edge
    old = export_onnx(q, tmp_path / "old.onnx", x[:4], activations=ranges, shared_grids=False, fuse=False)
    assert old.max_abs_diff <= old.tolerance
    old_ops = _optimized_ops(old.path, tmp_path)
    assert old_ops["QuantizeLinear"] > 1 and old_ops["Add"] + old_ops["Relu"] > 0


def test_relu6_net_drops_its_clips_and_quantizes_its_adds(tmp_path):
    q, x, ranges = _case(TinyMobile, scale=3.0)  # wide inputs: the ReLU6 clamps
    result = export_onnx(q, tmp_path / "m.onnx", x[:4], activations=ranges)
    assert result.max_abs_diff <= result.tolerance
    graph = onnx.load(result.path).graph
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    inits = {t.name: t for t in graph.initializer}
    for clip in (n for n in graph.node if n.op_type == "Clip"):
        top = clip.input[2]  # every Clip left is the uint8 clip of a reduced range, none a ReLU6
        kind = inits[top].data_type if top in inits else consts[top].attribute[0].t.data_type
        assert kind == onnx.TensorProto.UINT8
    ops = _optimized_ops(result.path, tmp_path)
    assert ops["QLinearConv"] == 7 and ops["QLinearAdd"] == 2 and ops["QLinearGlobalAveragePool"] == 1
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # no float op in between
    assert not {"Conv", "Add", "GlobalAveragePool"} & set(ops)


@pytest.mark.parametrize("cls", [TinyResNet, TinyMobile])
def test_fuse_qdq_changes_no_value(cls, tmp_path):
    """The rewrites are exact: the graph with and without them computes the same numbers."""
    q, x, ranges = _case(cls, scale=3.0)
    fused = export_onnx(q, tmp_path / "fused.onnx", x[:4], activations=ranges, check=False)
    plain = export_onnx(q, tmp_path / "plain.onnx", x[:4], activations=ranges, fuse=False, check=False)
    n_fused, n_plain = (len(onnx.load(r.path).graph.node) for r in (fused, plain))
    assert n_fused < n_plain
    assert np.array_equal(_run(fused.path, x, optimize=False), _run(plain.path, x, optimize=False))


def test_shared_grids_chain_layers_and_int8_matches_fake_int8():
    q, x, ranges = _case(TinyResNet)
    fake = runtime(q, "fake-int8", activations=ranges)
    resolved = fake.activation_ranges
    assert resolved.shared_grids and resolved.resolved and not ranges.resolved
    # the stem's output grid is its readers' input grid (the max-pool between keeps grid values)
    stem_out = resolved.outputs["conv1"].to_dict()
    assert stem_out == resolved.inputs["layer1.conv1"].to_dict()
    assert resolved.inputs["layer1.conv1"].reduced_range  # 8-bit weights: codes 0..127
    adds = [k for k in resolved.inputs if k.startswith("tensor_quant")]
    assert len(adds) == 2
    assert resolved.outputs[adds[0]].to_dict() == resolved.inputs["layer2.conv1"].to_dict()
    int8 = runtime(q, "int8", activations=ranges)
    with torch.no_grad():
        step = max(float(g.scale) for g in resolved.outputs.values())
        assert float((int8(x) - fake(x)).abs().max()) <= 2 * step
    unshared = runtime(q, "fake-int8", activations=ranges, shared_grids=False).activation_ranges
    assert unshared.outputs["conv1"].to_dict() != unshared.inputs["layer1.conv1"].to_dict()
    assert not [k for k in unshared.inputs if k.startswith("tensor_quant")]  # adds in float


@pytest.mark.parametrize("activation_range", ["auto", "full"])
def test_saved_ranges_reproduce_the_export(activation_range, tmp_path):
    """The per-layer range choice is in the saved ranges: read back, export makes the same graph."""
    q, x, ranges = _case(TinyResNet)
    first = export_onnx(q, tmp_path / "a.onnx", x[:4], activations=ranges, activation_range=activation_range)
    saved = json.loads(json.dumps(first.activation_ranges.to_dict()))
    assert saved["activation_range"] == first.activation_range and saved["shared_grids"] is True
    if activation_range == "full":
        assert set(saved["activation_range"].values()) == {"full"}
    loaded = ActivationRanges.from_dict(saved)
    again = export_onnx(q, tmp_path / "b.onnx", x[:4], activations=loaded)  # activation_range="auto"
    assert again.activation_range == first.activation_range
    assert again.weight_format == first.weight_format
    assert again.activation_ranges.to_dict() == first.activation_ranges.to_dict()
    assert np.array_equal(_run(first.path, x), _run(again.path, x))
    fake = runtime(q, "fake-int8", activations=loaded)
    assert fake.activation_range == first.activation_range


def test_save_load_export_reproduces_the_graph(tmp_path):
    """Ranges saved in the model file: load, then export without ranges, gives the same graph."""
    import cetopt

    q, x, ranges = _case(TinyResNet)
    first = export_onnx(q, tmp_path / "a.onnx", x[:4], activations=ranges, activation_range="full")
    cetopt.save(q, tmp_path / "m.safetensors", activations=first.activation_ranges)
    loaded = cetopt.load(tmp_path / "m.safetensors", model=TinyResNet())
    assert loaded.activation_ranges.to_dict() == first.activation_ranges.to_dict()
    again = export_onnx(loaded, tmp_path / "b.onnx", x[:4])  # no ranges given: the saved ones
    assert again.activation_range == first.activation_range and set(again.activation_range.values()) == {
        "full"
    }
    assert np.array_equal(_run(first.path, x), _run(again.path, x))
    int8 = cetopt.load(tmp_path / "m.safetensors", model=TinyResNet(), mode="int8")
    assert int8.activation_range == first.activation_range  # static, on the saved grids
    with pytest.raises(TypeError, match="ActivationRanges"):
        cetopt.save(q, tmp_path / "n.safetensors", activations={"inputs": {}})
