"""Coupled channel groups, checked against answers derived by hand (the DepGraph semantics)."""

import numpy as np
import torch
from torch import nn

from cetopt.graph import channel_groups, find_group, trace_model
from tests.graph.models import example


def port_sets(kind):
    model, x = example(kind)
    return {frozenset(g.ports): g for g in channel_groups(trace_model(model, x))}


def test_mlp_groups():
    groups = port_sets("mlp")
    assert frozenset({("fc1", "out"), ("bn1", "in"), ("bn1", "out"), ("fc2", "in")}) in groups
    assert frozenset({("fc2", "out"), ("fc3", "in")}) in groups
    out = groups[frozenset({("fc3", "out")})]
    assert not out.prunable and "model output" in next(iter(out.reasons.values()))
    assert not groups[frozenset({("fc1", "in")})].prunable  # model input


def test_cnn_groups_and_flatten_index_mapping():
    model, x = example("cnn")
    group = find_group(channel_groups(trace_model(model, x)), "conv2")
    assert set(group.ports) == {("conv2", "out"), ("bn2", "in"), ("bn2", "out"), ("fc", "in")}
    # view(-1, 12*4*4) of (B, 12, 4, 4): feature j of fc belongs to channel j // 16
    assert np.array_equal(group.classes[("fc", "in")], np.arange(192) // 16)
    assert np.array_equal(group.classes[("conv2", "out")], np.arange(12))


def test_resnet_groups_match_hand_derived_answer():
    groups = port_sets("resnet")
    residual_stream = {
        ("stem", "out"),
        ("bn", "in"),
        ("bn", "out"),
        ("layer1.conv1", "in"),
        ("layer1.conv2", "out"),
        ("layer1.bn2", "in"),
        ("layer1.bn2", "out"),
        ("layer2.conv1", "in"),
        ("layer2.shortcut.0", "in"),
    }
    block1_inner = {
        ("layer1.conv1", "out"),
        ("layer1.bn1", "in"),
        ("layer1.bn1", "out"),
        ("layer1.conv2", "in"),
    }
    block2_inner = {
        ("layer2.conv1", "out"),
        ("layer2.bn1", "in"),
        ("layer2.bn1", "out"),
        ("layer2.conv2", "in"),
    }
    block2_out = {
        ("layer2.conv2", "out"),
        ("layer2.bn2", "in"),
        ("layer2.bn2", "out"),
        ("layer2.shortcut.0", "out"),
        ("layer2.shortcut.1", "in"),
        ("layer2.shortcut.1", "out"),
        ("fc", "in"),
    }
    for expected in (residual_stream, block1_inner, block2_inner, block2_out):
        assert frozenset(expected) in groups
        assert groups[frozenset(expected)].prunable
    assert groups[frozenset(residual_stream)].num_classes == 8


def test_transformer_groups():
    groups = port_sets("transformer")
    stream = {
        ("embed", "out"),
        ("block.attn", "in"),
        ("block.attn", "out"),
        ("block.norm1", "in"),
        ("block.norm1", "out"),
        ("block.ff1", "in"),
        ("block.ff2", "out"),
        ("block.norm2", "in"),
        ("block.norm2", "out"),
        ("pre_head", "in"),
    }
    assert frozenset(stream) in groups
    assert frozenset({("block.ff1", "out"), ("block.ff2", "in")}) in groups
    assert frozenset({("pre_head", "out"), ("head", "in")}) in groups


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 3, 1)
        self.b = nn.Conv1d(2, 5, 1)
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


def test_concat_places_channels_at_offsets():
    group = find_group(channel_groups(trace_model(Concat(), torch.randn(2, 2, 6))), "b")
    assert set(group.ports) == {("a", "out"), ("b", "out"), ("c", "in")}
    a, b, c = (group.classes[(n, p)] for n, p in (("a", "out"), ("b", "out"), ("c", "in")))
    assert np.array_equal(c[:3], a) and np.array_equal(c[3:], b) and len(set(c)) == 8


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_unknown_operation_freezes_its_channels_with_a_reason():
    group = find_group(channel_groups(trace_model(Opaque(), torch.randn(3, 4))), "a")
    assert not group.prunable
    assert "cumsum" in next(iter(group.reasons.values()))
