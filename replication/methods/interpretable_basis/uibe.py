"""UIBE (Doumanoglou et al., TAI 2024): an orthonormal basis whose thresholded projections are one-hot.

Reconstructed from the authors' later paper (spec 04 sections 3.2-3.5; nothing here is from UIBE's own
text). On standardised pixel vectors x̃ (`detectors.Standardizer`), with U ∈ R^{I×D} (orthonormal rows:
the first I rows of a rotation), one shared bias b and one shared margin M > 0:

    z_p = (U x̃_p − b) / M,    y_p = sigmoid(z_p),    q_p = y_p / ‖y_p‖₁

    L^s  = E_p[−Σ_i q_pi log2 q_pi]        sparsity: one active direction per pixel
    L^ma = E_p[−Σ_i q_pi log2 y_pi]        maximum activation: that direction's y towards 1
    L^mm = 1 / M                           maximum margin (one shared M)
    L    = λ_s L^s + λ_ma L^ma + λ_mm L^mm  (λ: 2.6, 2.8, 0.6, borrowed from EDDP step (a) [U for UIBE])

Parametrisation [I]: U is the weight of a bias-free `nn.Linear(D, I)` under
`torch.nn.utils.parametrizations.orthogonal` (matrix exponential map by default, `orthogonal_map`), so
U Uᵀ = I holds at every step with plain Adam; M = exp(m) keeps the margin positive. Initialisation: the
first I rows of a seeded Haar rotation (`analysis.rotation.random_rotation`), b = 0, M = 1 (for I < D
the parametrisation completes U to a D × D orthogonal base with torch's global generator, which is
seeded locally with the restart's seed so that fits repeat).

Optimisation [I]: Adam, epochs over the training pixels in seeded shuffled mini-batches,
ReduceLROnPlateau on the epoch's mean loss (factor 0.5, patience 10, cooldown 10: EDDP's schedule).
Stopping rule: after `epochs` epochs, or as soon as the schedule has halved the learning rate
`stop_halvings` times (the loss stopped improving that many times). Restarts: `restarts` fits from
different seeds; the one with the lowest training loss (evaluated on all training pixels after its
fit) is kept, and every restart's loss is reported.

Not UIBE: `inactive_weight` > 0 adds CBE's (2024) inactive-classifier loss
L^ic = mean_i (1/ν) ReLU(ν − E_p[y_pi^γ]), ν = τ / I, computed per mini-batch. It is off by default
and labelled as an extension wherever it is used. The other later losses (CBE's CNN-classifier loss,
EDDP's terms) need the network's head or unknown formulas and are left out.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from replication.analysis.rotation import random_rotation
from replication.methods.interpretable_basis.detectors import LinearDetectors, Standardizer, derived_seed
from replication.runtime import progress, resolve_device

ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")


@dataclass(frozen=True)
class UIBEConfig:
    """UIBE's settings (spec 04 sections 3.5-3.6): `directions` I (None: I = D), loss weights, Adam's
    `lr`, `batch_size` pixels per step, at most `epochs` epochs, the plateau schedule, the stopping
    rule (`stop_halvings`), `restarts`, `eps` in logs, the orthogonal map; `inactive_*` is not UIBE."""

    directions: int | None = None
    sparsity_weight: float = 2.6
    activation_weight: float = 2.8
    margin_weight: float = 0.6
    lr: float = 1e-3
    batch_size: int = 4096
    epochs: int = 800
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    plateau_cooldown: int = 10
    stop_halvings: int = 5
    restarts: int = 1
    eps: float = 1e-8
    orthogonal_map: str = "matrix_exp"
    inactive_weight: float = 0.0
    inactive_tau: float = 0.9
    inactive_gamma: float = 1.1

    def __post_init__(self):
        problems = []
        if self.directions is not None and self.directions < 1:
            problems.append(f"directions must be >= 1 or None (I = D); got {self.directions}")
        for name in ("batch_size", "epochs", "restarts", "stop_halvings"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("sparsity_weight", "activation_weight", "margin_weight", "inactive_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.orthogonal_map not in ORTHOGONAL_MAPS:
            problems.append(f"orthogonal_map must be one of {ORTHOGONAL_MAPS}; got {self.orthogonal_map!r}")
        if not 0 < self.plateau_factor < 1:
            problems.append(f"plateau_factor must lie in (0, 1); got {self.plateau_factor}")
        if problems:
            raise ValueError("bad UIBEConfig: " + "; ".join(problems) + ".")

    @property
    def is_uibe(self) -> bool:
        """False when a later paper's loss is switched on (results must then not be called UIBE's)."""
        return self.inactive_weight == 0


class UIBEModel(nn.Module):
    """z = (U x̃ − b) / M with U's rows orthonormal (orthogonal parametrisation), shared b and M = exp(m).

    `fixed=True` keeps U = `init` as a buffer and learns only b and M: the same parametrisation for a
    given basis (the natural basis, a random rotation), as claim U1's comparison needs."""

    def __init__(self, init: torch.Tensor, orthogonal_map: str = "matrix_exp", *, fixed: bool = False):
        super().__init__()
        directions, dim = init.shape
        if directions > dim:
            raise ValueError(f"UIBE needs I <= D orthonormal directions; got I = {directions} for D = {dim}.")
        self.rotation = None
        if fixed:
            self.register_buffer("fixed_directions", init.float().clone())
        else:
            self.rotation = parametrizations.orthogonal(nn.Linear(dim, directions, bias=False),
                                                        orthogonal_map=orthogonal_map)
            with torch.no_grad():
                self.rotation.weight = init.float()
        self.bias = nn.Parameter(torch.zeros(()))
        self.log_margin = nn.Parameter(torch.zeros(()))

    @property
    def directions(self) -> torch.Tensor:
        return self.fixed_directions if self.rotation is None else self.rotation.weight

    @property
    def margin(self) -> torch.Tensor:
        return self.log_margin.exp()

    def forward(self, standardized: torch.Tensor) -> torch.Tensor:
        return (standardized @ self.directions.T - self.bias) / self.margin


def uibe_losses(logits: torch.Tensor, margin: torch.Tensor, config: UIBEConfig) -> dict[str, torch.Tensor]:
    """The loss terms (means over the P pixels of P × I `logits`) and their weighted `total`."""
    log_y = F.logsigmoid(logits)
    y = log_y.exp()
    q = y / (y.sum(dim=1, keepdim=True) + config.eps)
    terms = {
        "sparsity": -(q * q.clamp_min(config.eps).log()).sum(dim=1).mean() / math.log(2),
        "activation": -(q * log_y).sum(dim=1).mean() / math.log(2),
        "margin": 1.0 / margin,
    }
    total = (config.sparsity_weight * terms["sparsity"] + config.activation_weight * terms["activation"]
             + config.margin_weight * terms["margin"])
    if config.inactive_weight > 0:
        nu = config.inactive_tau / logits.shape[1]
        usage = y.pow(config.inactive_gamma).mean(dim=0)
        terms["inactive"] = (F.relu(nu - usage) / nu).mean()
        total = total + config.inactive_weight * terms["inactive"]
    terms["total"] = total
    return terms


@dataclass
class UIBEBasis:
    """A fitted UIBE basis: `directions` U (I × D, orthonormal rows in the standardised space), the shared
    `bias` and `margin`, the `standardizer`; the chosen restart, every restart's final training loss and
    the per-epoch `history` (restart, epoch, lr, loss terms)."""

    directions: torch.Tensor
    bias: float
    margin: float
    standardizer: Standardizer
    config: UIBEConfig
    seed: int
    restart: int
    restart_losses: list[float]
    history: pd.DataFrame = field(repr=False)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, *, batch_size: int = 65536,
               device: str | torch.device | None = None) -> torch.Tensor:
        """z = (U x̃ − b) / M for P × D pixels (P × I, float32 on the CPU), in chunks of `batch_size` pixels."""
        device = resolve_device(device)
        directions = self.directions.to(device)
        out = [((self.standardizer(chunk.to(device).float()) @ directions.T - self.bias) / self.margin).cpu()
               for chunk in pixels.split(batch_size)]
        return torch.cat(out)

    def detectors(self) -> LinearDetectors:
        """The rule y > 0.5 in the original space: (u_i ⊘ σ) · x > b + (u_i ⊘ σ) · μ (M > 0 drops out)."""
        weight = self.directions.double() / self.standardizer.std.double()
        threshold = self.bias + weight @ self.standardizer.mean.double()
        return LinearDetectors(weight, threshold, tuple(f"direction {i}" for i in range(len(weight))))

    def original_directions(self) -> torch.Tensor:
        """u_i ⊘ σ normalised to unit length: the directions in the original feature space, not
        orthogonal unless σ is isotropic (spec 04 section 3.3)."""
        weight = self.detectors().weight
        return weight / weight.norm(dim=1, keepdim=True)

    def settings(self) -> dict:
        return {**asdict(self.config), "seed": self.seed, "restart": self.restart, "is_uibe": self.config.is_uibe}


def fit_uibe(pixels: torch.Tensor, config: UIBEConfig = UIBEConfig(), *, seed: int = 0,
             device: str | torch.device | None = None, basis: torch.Tensor | None = None,
             workers: int = 1) -> UIBEBasis:
    """Fit UIBE on P × D training pixel vectors (`detectors.pixel_matrix` of a layer's features; they
    stay where they are, mini-batches go to `device`) and keep the restart of lowest training loss.
    `workers` > 1 fits the restarts in that many CPU processes of one thread each (small fits are
    per-step overhead, which threads cannot split); on CUDA they run in turn.

    `basis` (I × D orthonormal rows in the standardised space, e.g. the identity or a random rotation)
    fixes U and fits only the shared b and M, once (`config.directions` and `restarts` are then unused)."""
    if pixels.ndim != 2 or len(pixels) < 2:
        raise ValueError(f"pixels must be a P × D matrix of pixel vectors with P >= 2; got shape {tuple(pixels.shape)}. "
                         "Use detectors.pixel_matrix(features).")
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("pixels contain NaN or infinite values; check the layer's features.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer (CPU processes for the restarts); got {workers!r}.")
    device = resolve_device(device)
    dim = pixels.shape[1]
    directions = config.directions or dim
    if basis is not None:
        basis = torch.as_tensor(basis, dtype=torch.float64)
        if basis.ndim != 2 or basis.shape[1] != dim or basis.shape[0] > dim or not torch.allclose(
                basis @ basis.T, torch.eye(len(basis), dtype=torch.float64), atol=1e-5):
            raise ValueError(f"basis must be I × {dim} with orthonormal rows; got shape {tuple(basis.shape)} "
                             "(or rows that are not orthonormal). Use torch.eye(D) or analysis.rotation.random_rotation.")
    elif directions > dim:
        raise ValueError(f"config.directions = {directions} exceeds the feature dimension D = {dim}; "
                         "UIBE's basis is orthonormal, so use I <= D.")
    standardizer = Standardizer.fit(pixels)
    jobs = [(derived_seed(seed, restart), restart) for restart in range(1 if basis is not None else config.restarts)]
    job = (pixels, standardizer, config, directions, device, basis)
    if workers > 1 and len(jobs) > 1 and device.type == "cpu":
        fits = _fit_in_processes(job, jobs, workers)
    else:
        fits = [_fit_once(*job, restart_seed, restart) for restart_seed, restart in jobs]
    losses = [fit.loss for fit in fits]
    best = fits[int(np.argmin(losses))]
    return UIBEBasis(
        directions=best.directions, bias=best.bias, margin=best.margin, standardizer=standardizer, config=config,
        seed=seed, restart=best.restart, restart_losses=losses,
        history=pd.concat([fit.history for fit in fits], ignore_index=True),
    )


@dataclass(frozen=True)
class _RestartFit:
    """One restart's fitted parameters, its training loss over all pixels and its history: plain
    tensors and numbers, so that a worker process can hand it back (parametrised modules do not pickle)."""

    restart: int
    directions: torch.Tensor
    bias: float
    margin: float
    loss: float
    history: pd.DataFrame


_WORKER_JOB: tuple = ()


def _start_worker(job: tuple) -> None:
    """A restart worker's initialiser: one torch thread per process, the shared fit inputs kept once."""
    global _WORKER_JOB
    torch.set_num_threads(1)
    os.environ["REPLICATION_QUIET"] = "1"  # the parent's bar counts restarts; per-epoch bars would interleave
    _WORKER_JOB = job


def _fit_in_worker(restart_seed: int, restart: int) -> _RestartFit:
    return _fit_once(*_WORKER_JOB, restart_seed, restart)


def _fit_in_processes(job: tuple, jobs: list[tuple[int, int]], workers: int) -> list[_RestartFit]:
    """The restarts spread over `workers` CPU processes (forked where the platform can, so the pixels are
    shared, not copied), each with one torch thread; in restart order, so the choice equals the serial one."""
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    workers = min(workers, len(jobs))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(job,)) as pool:
        futures = [pool.submit(_fit_in_worker, *restart) for restart in jobs]
        for _ in progress(as_completed(futures), desc=f"UIBE restarts on {workers} processes", total=len(futures)):
            pass
        return [future.result() for future in futures]


def _fit_once(pixels, standardizer, config, directions, device, basis, seed, restart) -> _RestartFit:
    init = random_rotation(pixels.shape[1], seed)[:directions] if basis is None else basis
    with torch.random.fork_rng(devices=[]):  # the parametrisation completes U to a square matrix with torch.randn
        torch.manual_seed(seed)
        model = UIBEModel(init, config.orthogonal_map, fixed=basis is not None).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.plateau_factor, patience=config.plateau_patience, cooldown=config.plateau_cooldown)
    generator = torch.Generator().manual_seed(seed)
    rows, halvings = [], 0
    desc = "UIBE: b and M of a fixed basis" if basis is not None else f"UIBE restart {restart + 1}/{config.restarts}"
    for epoch in progress(range(config.epochs), desc=desc):
        sums = None
        for index in torch.randperm(len(pixels), generator=generator).split(config.batch_size):
            terms = uibe_losses(model(standardizer(pixels[index].to(device).float())), model.margin, config)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            batch = {k: v.detach() * len(index) for k, v in terms.items()}
            sums = batch if sums is None else {k: sums[k] + batch[k] for k in sums}
        means = {k: float(v) / len(pixels) for k, v in sums.items()}
        lr = optimizer.param_groups[0]["lr"]
        rows.append({"restart": restart, "epoch": epoch, "lr": lr, **means})
        schedule.step(means["total"])
        halvings += optimizer.param_groups[0]["lr"] < lr
        if halvings >= config.stop_halvings:
            break
    return _RestartFit(restart, model.directions.detach().cpu(), float(model.bias.detach()), float(model.margin.detach()),
                       _training_loss(model, pixels, standardizer, config, device), pd.DataFrame(rows))


@torch.no_grad()
def _training_loss(model: UIBEModel, pixels, standardizer, config, device) -> float:
    """The weighted loss of the fitted parameters over all training pixels (batch means, weighted)."""
    total = 0.0
    for chunk in pixels.split(config.batch_size):
        total += float(uibe_losses(model(standardizer(chunk.to(device).float())), model.margin, config)["total"]) * len(chunk)
    return total / len(pixels)
