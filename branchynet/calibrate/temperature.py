"""Temperature scaling: one temperature per exit fitted on the validation logits (NLL),
folded into the branch's last linear layer so that the engine pays nothing for it."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..models.branchynet import BranchyNet
from .exit_table import _first_inputs, check_split

__all__ = ["collect_logits", "fit_temperature", "expected_calibration_error", "fold_temperature",
           "scale_temperatures"]


@torch.no_grad()
def collect_logits(model: BranchyNet, data, *, batch_size: int = 256,
                   device: str | torch.device = "cpu"):
    """Every exit's logits on ``data`` (one pass).

    Returns:
        ``(logits, target)``: N tensors [M, C] (the model's dtype, on the CPU) and [M] int64.
    """
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for x, y in loader:
            logits.append([z.cpu() for z in model(x.to(device))])
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("data is empty: temperature scaling needs at least one sample")
    return [torch.cat(z) for z in zip(*logits)], torch.cat(targets)


def _usable_rows(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # NaN rows, +inf logits and a -inf (masked) true class have no finite NLL at any T.
    ok = ~torch.isnan(z).any(1) & ~torch.isposinf(z).any(1)
    return ok & torch.isfinite(z.gather(1, y[:, None]).squeeze(1))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, *, bounds=(0.01, 100.0)) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T).

    Args:
        logits: [M, C] one exit's logits on the validation split.
        target: [M] int64 labels.
        bounds: T is clipped to this range (separable data drives T to 0).

    Returns:
        T > 0 (1.0 when no row has a finite NLL).
    """
    z = logits.detach().clone().double()
    y = target.detach().clone().long()
    ok = _usable_rows(z, y)
    z, y = z[ok], y[ok]
    if z.shape[0] == 0:
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().clamp(lo, hi).exp())


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, *, bins: int = 15) -> float:
    """ECE of the top-class confidence: ``sum_b |B_b| / M * |acc(B_b) - conf(B_b)|`` over
    ``bins`` equal-width confidence bins (Guo et al., 2017).

    Args:
        logits: [M, C]. target: [M] int64.
    """
    z = logits.detach().double()
    ok = ~torch.isnan(z).any(1)
    z, y = z[ok], target[ok]
    if z.shape[0] == 0:
        return 0.0
    conf, pred = z.softmax(1).max(1)
    correct = (pred == y).double()
    b = (conf * bins).long().clamp(0, bins - 1)
    count = torch.bincount(b, minlength=bins).double()
    gap = torch.bincount(b, correct - conf, minlength=bins).abs()
    return float(gap.sum() / count.sum())


def _last_linear(branch: torch.nn.Module) -> torch.nn.Linear | None:
    last = None
    for mod in branch.modules():
        if isinstance(mod, torch.nn.Linear):
            last = mod
    return last


def _fold_layer(model: BranchyNet, n: int, t: float) -> torch.nn.Linear | None:
    """The ``nn.Linear`` that exit n's temperature is folded into, or None for a final
    exit that cannot take it (left at T = 1.0)."""
    branch = model.branches[n]
    lin = _last_linear(branch)
    if lin is None and n == model.num_exits - 1:
        # A parameter-free final branch passes the last stage's output on.
        return _last_linear(model.stages[-1]) if not any(True for _ in branch.parameters()) else None
    if lin is None:
        raise ValueError(f"branch {n} has no nn.Linear layer to fold temperature {t:.4g} into")
    return lin


@torch.no_grad()
def _restore(saved: list) -> None:
    """Put back the weights and biases saved before folding, bit for bit."""
    for lin, w, b in saved:
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)


def _check_folded(model: BranchyNet, before, after, temps: list, saved: list) -> None:
    """Every exit's logits after folding must be its logits before divided by T; a final
    exit folded into the last stage that is not is undone and left at 1.0 (``temps`` is
    updated), any other exit undoes every fold and raises."""
    last = model.num_exits - 1
    for n, (z0, z1, t) in enumerate(zip(before, after, temps)):
        want = z0.double() / t
        finite = want[torch.isfinite(want)]  # a NaN row must not make the tolerance NaN
        scale = float(finite.abs().amax()) if finite.numel() else 0.0
        if torch.allclose(z1.double(), want, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
            continue
        if n == last and _last_linear(model.branches[n]) is None:
            # Folded into the last stage (above), whose output feeds no other exit:
            # undo that one and leave the final exit unscaled.
            _restore([saved.pop()])
            temps[n] = 1.0
            return
        _restore(saved)
        raise ValueError(
            f"branch {n}: its logits are not its last nn.Linear's output (a layer after it, "
            f"or a shared one), so temperature {t:.4g} cannot be folded into it")


@torch.no_grad()
def fold_temperature(model: BranchyNet, temperatures: Sequence[float], example: torch.Tensor) -> list[float]:
    """Divide each branch's logits by its temperature at no runtime cost: the weight and
    bias of the branch's last ``nn.Linear`` are divided by T (argmax, hence every
    prediction, is unchanged; the entropies are those of ``softmax(z / T)``).

    The final exit's score is never compared with a threshold, so its temperature only
    matters for calibrated probabilities. Where its branch has no ``nn.Linear`` but no
    parameters either (the ``nn.Identity`` of :func:`~branchynet.attach_exits` models), T
    is folded into the last stage's last ``nn.Linear``; where that is not possible (no
    such layer, or one whose output is not the logits) the final exit is left at T = 1.0,
    and the returned list says so.

    Args:
        model: the BranchyNet, changed in place.
        temperatures: N values > 0, one per exit (1.0 leaves an exit as it is).
        example: [B, ...] inputs, used to check that each branch's logits are its last
            linear layer's output divided by T after folding.

    Returns:
        The N temperatures folded: ``temperatures``, with the last one 1.0 where it could
        not be folded (see above).

    Raises:
        ValueError: a side branch whose logits are not an affine function of its last
            linear layer's output (nothing folded then).
    """
    temps = [float(t) for t in temperatures]
    if len(temps) != model.num_exits or not all(t > 0 and math.isfinite(t) for t in temps):
        raise ValueError(f"temperatures: expected {model.num_exits} finite values > 0, got {temps}")
    was_training = model.training
    model.eval()
    saved = []
    try:
        before = model(example)
        # every layer found before any is changed: a branch without one leaves the model as it was
        layers = {n: _fold_layer(model, n, t) for n, t in enumerate(temps) if t != 1.0}
        for n, lin in layers.items():
            t = temps[n]
            if lin is None:
                temps[n] = 1.0
                continue
            saved.append((lin, lin.weight.clone(), None if lin.bias is None else lin.bias.clone()))
            lin.weight.div_(t)
            if lin.bias is not None:
                lin.bias.div_(t)
        _check_folded(model, before, model(example), temps, saved)
    except BaseException:
        # whatever failed (a check, torch, an interrupt): the weights as they were
        _restore(saved)
        raise
    finally:
        model.train(was_training)
    return temps


def _snapshot(model: BranchyNet) -> list:
    """The weights and biases :func:`fold_temperature` may change (each branch's last
    ``nn.Linear`` and the last stage's), in :func:`_restore`'s format."""
    layers = [_last_linear(b) for b in model.branches] + [_last_linear(model.stages[-1])]
    unique = {id(lin): lin for lin in layers if lin is not None}.values()
    return [(lin, lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
            for lin in unique]


def scale_temperatures(model: BranchyNet, val, *, batch_size: int = 256, device: str | torch.device = "cpu"):
    """Fit every exit's temperature on ``val`` and fold it into ``model`` (in place).

    Returns:
        ``(temperatures, ece)``: the N temperatures folded (:func:`fold_temperature`) and
        ``{"before": [N], "after": [N]}`` expected calibration errors.

    Raises:
        ValueError: labels outside [0, C) or samples with NaN logits in ``val``
            (:func:`~branchynet.calibrate.exit_table.check_split`), before any weight is
            changed; a temperature that cannot be folded (the weights put back).
    """
    temps, ece, _ = _scale(model, val, batch_size=batch_size, device=device)
    return temps, ece


def _scale(model: BranchyNet, val, *, batch_size: int, device):
    """:func:`scale_temperatures`, plus the weights as they were before folding (for
    :func:`_restore`, should a later step of the calibration fail)."""
    logits, y = collect_logits(model, val, batch_size=batch_size, device=device)
    check_split(torch.stack([z.isnan().any(1) for z in logits]), y, logits[0].shape[1])
    temps = [fit_temperature(z, y) for z in logits]
    saved = _snapshot(model)
    try:
        temps = fold_temperature(model, temps, _first_inputs(val, 256).to(device))
        ece = {"before": [expected_calibration_error(z, y) for z in logits],
               "after": [expected_calibration_error(z.double() / t, y) for z, t in zip(logits, temps)]}
    except BaseException:
        _restore(saved)
        raise
    return temps, ece, saved
