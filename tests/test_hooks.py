"""Hooks: named capture, graph kept or cut, hooks removed on exit and on exceptions, clear errors."""
import pytest
import torch
from torch import nn

from replication.models.hooks import capture_activations, forward_until, get_module, layer_names


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.0).reshape(4, 3) - 6)
        model[0].bias.zero_()
    return model


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_get_module_dotted_names():
    model = tiny_model()
    assert get_module(model, "2.0") is model[2][0]
    assert layer_names(model) == ["0", "1", "2", "2.0"]


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown layer 'layer5'; valid layers: 0, 1, 2, 2\.0"):
        get_module(tiny_model(), "layer5")


def test_capture_values_and_latest_forward():
    model = tiny_model()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with capture_activations(model, ["0", "1"]) as acts:
        model(x)
        expected = x @ model[0].weight.T
        assert torch.equal(acts["0"], expected)
        assert torch.equal(acts["1"], expected.clamp_min(0))
        assert not acts["0"].requires_grad
        model(2 * x)
        assert torch.equal(acts["0"], 2 * expected)  # refreshed by the latest forward
    assert hook_count(model) == 0


def test_detach_false_keeps_graph():
    model = tiny_model()
    with capture_activations(model, "1", detach=False) as acts:
        model(torch.ones(1, 3))
        acts["1"].sum().backward()
    # d/dW0 of sum(relu(W0 x)) with x = 1: rows of active units get ones.
    active = (model[0].weight.sum(1) > 0).float()
    assert torch.equal(model[0].weight.grad, active[:, None].expand(4, 3))


def test_hooks_removed_after_exception():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_activations(model, ["0", "2.0"]):
            model(torch.ones(1, 3))
            assert hook_count(model) == 2
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_bad_name_registers_nothing():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown layer"):
        with capture_activations(model, ["0", "nope"]):
            pass
    assert hook_count(model) == 0


class AddsInPlace(nn.Module):
    """Like ResNet's BasicBlock: a layer whose output is modified in place later in the forward."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Identity()

    def forward(self, x):
        out = self.scale(x * 2)
        out += 1
        return out.relu_()


@pytest.mark.parametrize("detach", [True, False])
def test_capture_is_immune_to_later_in_place_ops(detach):
    model = AddsInPlace()
    x = torch.tensor([-3.0, 1.0], requires_grad=not detach)
    with capture_activations(model, "scale", detach=detach) as acts:
        model(x)
    assert torch.equal(acts["scale"].detach(), torch.tensor([-6.0, 2.0]))
    with capture_activations(model, "scale", clone=False) as acts:
        model(x.detach())
    assert torch.equal(acts["scale"], torch.tensor([0.0, 3.0]))  # the documented pitfall without clone


class Recorder(nn.Module):
    """Identity that records every call, to see which modules a forward pass reached."""

    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_forward_until_reads_the_layers_and_skips_the_rest():
    log: list[str] = []
    model = nn.Sequential(nn.Linear(3, 4), Recorder("a", log), nn.ReLU(), Recorder("b", log), Recorder("c", log))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.0).reshape(4, 3) - 6)
        model[0].bias.zero_()
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with forward_until(model, ["2", "0"]) as run:
        outputs = run(x)
        assert list(outputs) == ["2", "0"] and log == ["a"]  # b and c come after the last requested layer
        assert torch.equal(outputs["0"], x @ model[0].weight.T)
        assert torch.equal(outputs["2"], (x @ model[0].weight.T).clamp_min(0))
        assert torch.equal(run(2 * x)["0"], 2 * outputs["0"]) and log == ["a", "a"]  # every pass stops again
    assert hook_count(model) == 0
    assert model(x).shape == (2, 4) and log == ["a", "a", "a", "b", "c"]  # the model runs whole again


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.unused = tiny_model(), nn.Linear(2, 2)

    def forward(self, x):
        return self.net(x)


def test_forward_until_errors_leave_no_hooks():
    model = WithUnused()
    with pytest.raises(ValueError, match=r"layers \['unused'\] did not run in the forward pass of WithUnused"):
        with forward_until(model, ["net.0", "unused"]) as run:
            run(torch.ones(1, 3))
    assert hook_count(model) == 0
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        with forward_until(model, ["nope"]):
            pass
    assert hook_count(model) == 0
