"""The gradient noise scale: how large a batch the gradient's noise asks for (McCandlish et al., 2018).

McCandlish, Kaplan, Amodei and the OpenAI Dota team, "An Empirical Model of Large-Batch Training"
(arXiv:1812.06162) define the *simple noise scale*

    B_simple = tr(Sigma) / |G|^2

where G is the true (full-data) gradient and Sigma the covariance of one example's gradient. A
batch of B examples estimates G with noise of size tr(Sigma) / B: batches much smaller than
B_simple are dominated by noise (each step is cheap but not worth much), batches much larger
average away noise that was already small (each extra sample is wasted). Their critical batch
size B_crit, past which larger batches stop paying for themselves, is close to B_simple in their
experiments (it equals the exact noise scale B_noise when the Hessian is a multiple of the
identity).

Here the per-example gradients are exact (``torch.func``: ``vmap`` over ``grad`` of one example's
loss through ``functional_call``), so the two unbiased estimators of their Appendix A.1 are used
with B_small = 1 and B_big = n:

    |G|^2   ~ (n |g_mean|^2 - mean_i |g_i|^2) / (n - 1)
    tr(Sigma) ~ (mean_i |g_i|^2 - |g_mean|^2) * n / (n - 1)   (the sample variance, summed over parameters)

The gradients are summed chunk by chunk, so memory is ``chunk`` x the number of parameters.

>>> import torch
>>> from torch import nn
>>> _ = torch.manual_seed(0)
>>> x = torch.randn(256, 4); y = x.sum(1, keepdim=True) + 0.1 * torch.randn(256, 1)
>>> est = noise_scale(nn.Linear(4, 1), x, y, loss="mse")
>>> est.samples, est.b_simple > 0
(256, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import BatchfitError
from ._i18n import tr
from ._step import train_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, labels)


def _half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # 0.5 (f(x) - y)^2 summed over outputs: the loss whose gradient is x (f(x) - y) for a linear f
    return 0.5 * ((output - target) ** 2).sum()


# per-example losses by name: each is applied to ONE example (a batch of one)
LOSSES: dict[str, LossFn] = {"cross-entropy": _cross_entropy, "mse": _half_squared_error}


@dataclass(frozen=True)
class NoiseScale:
    """One estimate of the simple noise scale, with its two ingredients.

    ``grad_sq_norm`` is the unbiased estimate of |G|^2; it can come out zero or negative when the
    gradient is lost in the noise at this many samples, and then ``b_simple`` is ``inf``.
    """

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float
    samples: int
    when: str = ""

    @property
    def resolved(self) -> bool:
        """Whether |G|^2 stood out of the noise (a finite, positive estimate)."""
        return math.isfinite(self.b_simple) and self.grad_sq_norm > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "b_simple": self.b_simple if self.resolved else None,
            "trace_sigma": self.trace_sigma,
            "grad_sq_norm": self.grad_sq_norm,
            "samples": self.samples,
            "when": self.when,
        }

    def __str__(self) -> str:
        value = f"{self.b_simple:,.0f}" if self.resolved else tr("above {n:,} (|G|^2 not resolved)", n=self.samples)
        examples = tr("{n:,} examples", n=self.samples) + (", " + self.when if self.when else "")
        return f"B_simple = tr(Sigma) / |G|^2 = {self.trace_sigma:.4g} / {self.grad_sq_norm:.4g} = {value} ({examples})"


def per_example_grad_stats(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: str | LossFn = "cross-entropy",
    *,
    chunk: int = 64,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Sum of the per-example gradients (by parameter name) and sum of their squared norms.

    The model runs in eval mode (dropout off, BatchNorm on its running statistics: in train mode
    BatchNorm mixes the examples of a batch, and one example's gradient is not defined); its own
    parameters, buffers and mode are left as they were.
    """
    from torch.func import functional_call, grad, vmap

    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    n = inputs.shape[0]
    if n < 2 or targets.shape[0] != n:
        raise BatchfitError(
            tr(
                "the noise scale needs at least 2 examples with one target each, got {n} inputs and {shape} targets",
                n=n,
                shape=targets.shape[0],
            ),
            hint=tr("give a few hundred examples"),
        )
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise BatchfitError(tr("the model has no trainable parameters"), hint=tr("the noise scale needs gradients"))
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    sq = torch.zeros((), dtype=torch.float64, device=inputs.device)
    with train_mode(model, False):
        for start in range(0, n, chunk):
            grads = per_example(params, inputs[start : start + chunk], targets[start : start + chunk])
            for k, g in grads.items():
                g64 = g.to(torch.float64)
                sums[k] += g64.sum(0)
                sq += g64.flatten(1).pow(2).sum()
    return sums, sq, n


def noise_scale(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: str | LossFn = "cross-entropy",
    *,
    chunk: int = 64,
    when: str = "",
) -> NoiseScale:
    """B_simple from the per-example gradients of ``model`` on ``inputs`` / ``targets``.

    ``loss`` is applied to one example at a time: ``"cross-entropy"`` (integer labels), ``"mse"``
    (0.5 x squared error) or ``fn(output, target)``. The scale of the loss cancels in B_simple.
    """
    sums, sq, n = per_example_grad_stats(model, inputs, targets, loss, chunk=chunk)
    mean_sq_norm = float(sq) / n  # mean_i |g_i|^2
    g_mean_sq = float(sum((s / n).pow(2).sum() for s in sums.values()))  # |g_mean|^2
    grad_sq = (n * g_mean_sq - mean_sq_norm) / (n - 1)
    trace = (mean_sq_norm - g_mean_sq) * n / (n - 1)
    b = trace / grad_sq if grad_sq > 0 else math.inf
    return NoiseScale(b, trace, grad_sq, n, when)


__all__ = ["LOSSES", "NoiseScale", "noise_scale", "per_example_grad_stats"]
