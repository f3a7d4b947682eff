"""The fused CPU kernels of CGL against the eager PyTorch reference: values and every gradient, both
forms of psi, free filters, L_s alone; the vectorised sigmoid; thread-count independence; and the
loss terms computing the same losses and weight gradients with either kernel; the reuse of gradient
memory."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from replication import paths
from replication.methods.concept_groups import STD_EPS, CGLConfig, SoftReceptiveField, cgl_loss_terms, spatial_spread
from replication.methods.concept_groups.eager_kernels import GroupShiftL1, StdSoftMap
from replication.methods.concept_groups.soft_map_kernels import GradientBuffer, SoftMapStatistics, _sigmoid
from replication.models.hooks import capture_activations
from replication.models.small_cnns import TwoLayerCNN
from tests.helpers import assert_close

SHIFTS = (1, 3, 2)


def statistics(kernel: str, activation, p1, p2, gamma, groups, size, with_spread, normalise=False, eps=1e-4):
    """(l1, mass, spread) of one layer by the fused function or the eager reference ops."""
    n, c, h, w = activation.shape
    if kernel == "fused":
        ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
        if normalise:
            ys, xs = ys / (h - 1), xs / (w - 1)
        scale = p1.expand(c) if gamma is None else p1 / gamma
        l1, mass, spread = SoftMapStatistics.apply(activation, scale, p2, gamma is None, STD_EPS, groups, size, SHIFTS,
                                                   (ys, xs) if with_spread else None, eps)
        return l1, mass, spread if with_spread else None
    if gamma is None:
        psi = StdSoftMap.apply(activation, p1, p2, STD_EPS)
    else:
        psi = torch.sigmoid(activation * (p1 / gamma).view(1, -1, 1, 1) + p2)
    l1, _ = GroupShiftL1.apply(psi.flatten(2).contiguous(), groups, size, SHIFTS)
    spread = spatial_spread(psi, eps=eps, normalise_coordinates=normalise) if with_spread else None
    return l1, psi.flatten(2).sum(-1), spread


@pytest.mark.parametrize("bn_form", [False, True])
@pytest.mark.parametrize("with_spread", [True, False])
def test_fused_statistics_and_gradients_match_the_eager_reference(bn_form, with_spread):
    generator = torch.Generator().manual_seed(0)
    n, c, h, w, groups, size = 3, 11, 5, 6, 2, 4  # 3 free filters
    weights = [torch.randn(n, groups, len(SHIFTS), size, generator=generator), torch.randn(n, c, generator=generator),
               torch.randn(n, c, generator=generator)]
    activation = (3 * torch.randn(n, c, h, w, generator=generator)).requires_grad_()
    gamma = (torch.rand(c, generator=generator) + 0.5).requires_grad_() if bn_form else None
    results = {}
    for kernel in ("fused", "eager"):
        p1, p2 = torch.tensor(1.5, requires_grad=True), torch.tensor(-0.3, requires_grad=True)
        outputs = statistics(kernel, activation, p1, p2, gamma, groups, size, with_spread, normalise=bn_form)
        loss = sum((out * weight).sum() for out, weight in zip(outputs, weights) if out is not None)
        inputs = [activation, p1, p2] + ([gamma] if bn_form else [])
        results[kernel] = [o.detach() for o in outputs if o is not None] + list(torch.autograd.grad(loss, inputs))
    for fused, eager in zip(results["fused"], results["eager"]):
        assert_close(fused, eager, rtol=1e-4, atol=1e-5)


def test_fused_statistics_without_groups_give_mass_and_spread_only():
    activation = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    p1, p2 = torch.tensor(1.0), torch.tensor(0.0)
    l1, mass, spread = statistics("fused", activation, p1, p2, None, 0, 0, True)
    _, eager_mass, eager_spread = statistics("eager", activation, p1, p2, None, 1, 5, True)
    assert l1.shape == (2, 0, len(SHIFTS), 0)
    assert_close(mass, eager_mass, rtol=1e-5)
    assert_close(spread, eager_spread, rtol=1e-5)


def test_vectorised_sigmoid_is_float32_accurate_and_saturates():
    z = np.concatenate([np.linspace(-120, 120, 2001), [0.0, 1e-8, -1e-8, 87.5, -87.5]]).astype(np.float32)
    ours = np.array([_sigmoid(value) for value in z], dtype=np.float64)
    exact = 1 / (1 + np.exp(-z.astype(np.float64)))
    assert np.all(np.abs(ours - exact) <= 3e-7 * exact + 1e-37)
    assert ours[z == 120][0] == 1.0 and 0 <= ours[z == -120][0] < 1e-37


def test_fused_results_do_not_depend_on_the_thread_count():
    activation = torch.randn(6, 10, 7, 7, generator=torch.Generator().manual_seed(2), requires_grad=True)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            l1, mass, spread = statistics("fused", activation, torch.tensor(1.0), torch.tensor(0.0), None, 2, 5, True)
            (grad,) = torch.autograd.grad((l1.sum() + mass.sum() + spread.sum()), activation)
            results.append((l1, mass, spread, grad))
    finally:
        torch.set_num_threads(previous)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_gradient_buffer_lends_its_memory_again_only_once_the_last_view_is_gone():
    buffer = GradientBuffer()
    first = buffer.take((3, 5))
    second = buffer.take((3, 5))  # `first` is still alive: fresh memory
    assert not np.shares_memory(first, second)
    memory = second.base  # the kept memory; holding it does not keep the view alive
    del first, second
    third = buffer.take((2, 7))
    assert np.shares_memory(third, memory) and third.shape == (2, 7) and third.ctypes.data % 64 == 0


def test_a_gradient_in_use_is_never_overwritten_by_the_next_backward():
    activation = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    buffer = GradientBuffer()

    def gradient(weight: float) -> torch.Tensor:
        l1, mass, _ = SoftMapStatistics.apply(activation, torch.ones(6), torch.tensor(0.0), True, STD_EPS, 1, 4, SHIFTS, None, 0.0, buffer)
        return torch.autograd.grad(weight * (l1.sum() + mass.sum()), activation)[0]

    kept = gradient(1.0)
    expected = kept.clone()
    assert_close(gradient(2.0), 2 * expected)
    assert torch.equal(kept, expected)
    del kept
    assert torch.equal(gradient(1.0), expected)


def test_fused_kernel_refuses_a_non_cpu_tensor():
    field = SoftReceptiveField(kernel="fused")
    with pytest.raises(ValueError, match="CPU only"):
        field.statistics(nn.Sequential(nn.Conv2d(1, 4, 1)), "0", torch.empty(2, 4, 3, 3, device="meta"))
    with pytest.raises(ValueError, match="kernel must be one of"):
        SoftReceptiveField(kernel="triton")


def cgl_losses_and_grads(kernel: str, model_seed: int = 0, **config):
    """L_g + L_s of a TwoLayerCNN (conv1: 2 groups of 3 and 1 free filter) and the conv weight gradients."""
    torch.manual_seed(model_seed)
    model = TwoLayerCNN(widths=(7, 10))
    terms = cgl_loss_terms(model, CGLConfig(groups=2, lambda_bn=0.0, lambda_g=1.0, lambda_s=1.0, kernel=kernel, **config))
    with capture_activations(model, ["conv1", "conv2"], detach=False) as acts:
        model(torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(3)))
        values = [term(model, acts) for term in terms]
    sum(values).backward()
    return torch.stack(values).detach(), model.conv1.weight.grad, model.conv2.weight.grad


@pytest.mark.parametrize("config", [{}, {"lg_reduction": "batch", "normalise_coordinates": True, "learn_p": True}])
def test_loss_terms_agree_across_kernels(config):
    fused, eager = cgl_losses_and_grads("fused", **config), cgl_losses_and_grads("eager", **config)
    for a, b in zip(fused, eager):
        assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_copies_of_captured_outputs_only_where_a_module_works_in_place():
    assert not any(t.clone_captured for t in cgl_loss_terms(TwoLayerCNN(widths=(4, 6)), CGLConfig()) if t.layers)
    in_place = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(inplace=True))
    assert all(t.clone_captured for t in cgl_loss_terms(in_place, CGLConfig(groups=2)) if t.layers)


FUSED_DIGEST = """
import hashlib, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_soft_map_kernels import statistics
torch.set_num_threads(2)
digest = hashlib.sha256()
for seed in range(3):
    a = torch.randn(32, 20, 15, 15, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    l1, mass, spread = statistics("fused", a, torch.tensor(1.0), torch.tensor(0.0), None, 4, 5, True)
    (grad,) = torch.autograd.grad(l1.sum() + mass.sum() + spread.sum(), a)
    for t in (l1, mass, spread, grad):
        digest.update(t.detach().numpy().tobytes())
print(digest.hexdigest())
"""


def test_fused_results_do_not_depend_on_a_compiled_kernel_cache(tmp_path):
    """Two fresh processes sharing one numba cache folder: the second would load what the first cached
    (when kernels are cached on disk), and must still compute exactly what the first computed."""
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "2"}
    digests = [subprocess.run([sys.executable, "-c", FUSED_DIGEST, str(paths.repo_root())], env=environment, capture_output=True, text=True,
                              check=True).stdout.strip() for _ in range(2)]
    assert digests[0] == digests[1] and len(digests[0]) == 64
