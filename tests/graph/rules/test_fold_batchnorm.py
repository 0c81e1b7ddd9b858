import pytest
import torch
from torch import nn

from cetopt.errors import RewriteError
from cetopt.graph import FoldBatchNorm, rewrite
from tests.graph.models import example


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_folding_every_batchnorm_is_exact(kind):
    model, x = example(kind)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    new = rewrite(model, [FoldBatchNorm(b) for b in bns], x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in new.modules())
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
    removed = sum(2 * model.get_submodule(b).num_features for b in bns)
    added_biases = (
        sum(
            model.get_submodule(n).out_channels
            for n in (
                "stem",
                "layer1.conv1",
                "layer1.conv2",
                "layer2.conv1",
                "layer2.conv2",
                "layer2.shortcut.0",
            )
        )
        if kind == "resnet"
        else 0
    )
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in new.parameters()) == (
        removed - added_biases
    )


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_producer_with_two_users_is_refused():
    with pytest.raises(RewriteError, match="feeds more than the BatchNorm"):
        rewrite(Shared().eval(), [FoldBatchNorm("bn")], torch.randn(2, 1, 5, 5))


def test_not_a_batchnorm():
    model, x = example("cnn")
    with pytest.raises(RewriteError, match="not a BatchNorm"):
        rewrite(model, [FoldBatchNorm("conv1")], x)


def test_folding_propagates_shapes_once_per_rewrite(monkeypatch):
    import cetopt.graph.rules.base as base

    model, x = example("resnet")
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 2
    calls = []
    real = base.propagate_shapes
    monkeypatch.setattr(base, "propagate_shapes", lambda gm, inputs: calls.append(1) or real(gm, inputs))
    new = rewrite(model, [FoldBatchNorm(b) for b in bns], x)
    assert len(calls) == 1  # the final check in finish(), not once per decision
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)
