"""The gradient noise scale against a case with a closed form, and the per-example gradients against a loop.

Linear regression with Gaussian inputs and noise: x ~ N(0, I_d), y = x.w* + e, e ~ N(0, s^2), the model
f(x) = x.w and the loss 0.5 (f(x) - y)^2. One example's gradient is g = x (x.d - e) with d = w - w*, so

    G = E[g] = d                                  |G|^2 = |d|^2
    E[g g^T] = |d|^2 I + 2 d d^T + s^2 I          (Isserlis: E[x x^T (x.d)^2] = |d|^2 I + 2 d d^T)
    Sigma = E[g g^T] - G G^T = (|d|^2 + s^2) I + d d^T
    tr(Sigma) = (d + 1) |d|^2 + d s^2             (d the dimension)
    B_simple = tr(Sigma) / |G|^2
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchfit._errors import BatchfitError
from batchfit._models import MLP
from batchfit._noise import noise_scale, per_example_grad_stats

DIM, N, NOISE_STD = 8, 20_000, 0.5


@pytest.fixture(scope="module")
def regression() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w_star = torch.randn(DIM, generator=gen, dtype=torch.float64)
    d = torch.randn(DIM, generator=gen, dtype=torch.float64)
    d = d / d.norm()  # |d| = 1
    x = torch.randn(N, DIM, generator=gen, dtype=torch.float64)
    e = NOISE_STD * torch.randn(N, generator=gen, dtype=torch.float64)
    y = (x @ w_star + e).unsqueeze(1)
    return {"w_star": w_star, "d": d, "x": x, "y": y}


def _linear(w: torch.Tensor) -> nn.Linear:
    model = nn.Linear(DIM, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.unsqueeze(0))
    return model


def test_closed_form_linear_regression(regression: dict[str, torch.Tensor]) -> None:
    w_star, d, x, y = regression["w_star"], regression["d"], regression["x"], regression["y"]
    est = noise_scale(_linear(w_star + d), x, y, loss="mse", chunk=2048)
    d2, s2 = float(d @ d), NOISE_STD**2
    true_g2 = d2
    true_trace = (DIM + 1) * d2 + DIM * s2
    # Tolerances: 4 standard errors of each estimator (a 4-sigma band: a correct estimator falls
    # outside it with probability ~6e-5; the data are seeded, so the test is deterministic).
    # |g_mean|^2: delta method, Var ~ 4 G^T Sigma G / n + 2 tr(Sigma^2) / n^2, both in closed form.
    g_sigma_g = (d2 + s2) * d2 + d2**2
    tr_sigma2 = DIM * (d2 + s2) ** 2 + 2 * (d2 + s2) * d2 + d2**2
    se_g2 = math.sqrt(4 * g_sigma_g / N + 2 * tr_sigma2 / N**2)
    # tr(Sigma): the mean of |g_i - G|^2 over n examples; its spread from the examples themselves
    g = x * (x @ d - (y.squeeze(1) - x @ w_star)).unsqueeze(1)  # g_i = x_i (x_i.d - e_i), by hand
    dev = (g - g.mean(0)).pow(2).sum(1)
    se_trace = float(dev.std()) / math.sqrt(N)
    assert abs(est.grad_sq_norm - true_g2) < 4 * se_g2, (est.grad_sq_norm, true_g2, se_g2)
    assert abs(est.trace_sigma - true_trace) < 4 * se_trace, (est.trace_sigma, true_trace, se_trace)
    lo = (true_trace - 4 * se_trace) / (true_g2 + 4 * se_g2)
    hi = (true_trace + 4 * se_trace) / (true_g2 - 4 * se_g2)
    assert lo < est.b_simple < hi
    assert est.resolved and est.samples == N
    # the same numbers from the hand-made per-example gradients (the estimators, not the statistics)
    mean_sq = float(g.pow(2).sum(1).mean())
    gbar_sq = float(g.mean(0).pow(2).sum())
    assert est.grad_sq_norm == pytest.approx((N * gbar_sq - mean_sq) / (N - 1), rel=1e-9)
    assert est.trace_sigma == pytest.approx(float(dev.sum()) / (N - 1), rel=1e-9)


def test_more_noise_more_batch(regression: dict[str, torch.Tensor]) -> None:
    """Closer to the optimum the gradient shrinks and the noise stays: B_simple grows as tr/|d|^2 predicts."""
    w_star, d, x, y = regression["w_star"], regression["d"], regression["x"], regression["y"]
    far = noise_scale(_linear(w_star + d), x, y, loss="mse", chunk=4096)
    near = noise_scale(_linear(w_star + 0.5 * d), x, y, loss="mse", chunk=4096)
    # closed form: (d+1) + d s^2 / |d|^2 -> 9 + 2 = 11 at |d| = 1, 9 + 8 = 17 at |d| = 0.5
    assert far.b_simple < near.b_simple
    assert near.b_simple == pytest.approx((DIM + 1) + DIM * NOISE_STD**2 / 0.25, rel=0.15)


def test_per_example_gradients_match_a_loop() -> None:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    model.train()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sums, sq, n = per_example_grad_stats(model, x, y, chunk=5)
    ref_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.named_parameters()}
    ref_sq = 0.0
    for i in range(12):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (k, _), gr in zip(model.named_parameters(), grads):
            ref_sum[k] += gr.double()
            ref_sq += float(gr.double().pow(2).sum())
    assert n == 12
    for k in ref_sum:
        torch.testing.assert_close(sums[k], ref_sum[k], rtol=1e-5, atol=1e-7)
    assert float(sq) == pytest.approx(ref_sq, rel=1e-5)
    # the model is as it was: weights, mode, no gradients left behind
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_too_few_examples() -> None:
    with pytest.raises(BatchfitError, match="at least 2 examples"):
        noise_scale(nn.Linear(3, 2), torch.randn(1, 3), torch.zeros(1, dtype=torch.int64))
