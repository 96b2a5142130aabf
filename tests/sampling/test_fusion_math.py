"""DDIM tables and step against diffusers' DDIMScheduler (SD2-base config), and the identities of the fusion
stage's re-noise update (docs/algorithm.md, "The loop", fusion stage), checked analytically and by Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from profusion_rt import sampling
from profusion_rt.core.presets import SD2_SCHEDULER


def _diffusers_scheduler() -> DDIMScheduler:
    return DDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if not k.startswith("_")})


@pytest.mark.parametrize("n", [1, 10, 50, 999])
def test_schedule_matches_diffusers(n):
    ref = _diffusers_scheduler()
    ref.set_timesteps(n)
    ours = sampling.DDIMSchedule.create(SD2_SCHEDULER, n)
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.int64))
    acp = ref.alphas_cumprod
    expected_prev = []
    for t in ref.timesteps.tolist():
        prev = t - ref.config.num_train_timesteps // n
        expected_prev.append(acp[prev] if prev >= 0 else ref.final_alpha_cumprod)
    torch.testing.assert_close(ours.alpha, acp[ref.timesteps], atol=0, rtol=1e-6)
    torch.testing.assert_close(ours.alpha_prev, torch.stack(expected_prev).float(), atol=0, rtol=1e-6)
    if n == 50:
        assert ours.timesteps[:3].tolist() == [981, 961, 941] and ours.timesteps[-1].item() == 1


def test_ddim_step_matches_diffusers():
    ref = _diffusers_scheduler()
    ref.set_timesteps(10)
    ours = sampling.DDIMSchedule.create(SD2_SCHEDULER, 10)
    g = torch.Generator().manual_seed(0)
    for i in (0, 4, 9):
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(eps, ref.timesteps[i], x, eta=0.0).prev_sample
        got = sampling.ddim_step(x, eps, ours.alpha[i], ours.alpha_prev[i])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _tables(n=10):
    sched = sampling.DDIMSchedule.create(SD2_SCHEDULER, n)
    return sched.alpha.double(), sched.alpha_prev.double()


@pytest.mark.parametrize("eta", [1.0, 0.5, 0.3])
def test_code_form_equals_x0_form(eta):
    """x − ê σ²√(1−a)/(1−a') + σ z √((1−a)(2−2a'−σ²))/(1−a') = √a x̂0 + √(1−a)[(1−k)ê + √(2k−k²) z]."""
    alpha, alpha_prev = _tables(10)
    c_eps, c_noise = sampling.fusion_coefficients(alpha.float(), alpha_prev.float(), eta)
    g = torch.Generator().manual_seed(1)
    for i in range(len(alpha)):
        a, ap = alpha[i].item(), alpha_prev[i].item()
        s2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        k = s2 / (1 - ap)
        x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        e = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        expected = math.sqrt(a) * x0 + math.sqrt(1 - a) * ((1 - k) * e + math.sqrt(2 * k - k * k) * z)
        got = sampling.fusion_update(x.float(), e.float(), z.float(), c_eps[i], c_noise[i])
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
        assert abs(c_eps[i].item() - k * math.sqrt(1 - a)) < 1e-6
        assert c_noise[i].item() > 0


def _ddpm_then_forward(a, ap, x, e):
    """Mean and variance (per element) of: DDPM ancestral step t -> t' with x̂0 from ê (posterior mean,
    variance σ² = (1−a')/(1−a)(1−a/a')), then forward noising t' -> t (× √(a/a'), + variance 1 − a/a')."""
    step_alpha = a / ap
    beta = 1 - step_alpha
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    post_mean = math.sqrt(ap) * beta / (1 - a) * x0 + math.sqrt(step_alpha) * (1 - ap) / (1 - a) * x
    post_var = (1 - ap) / (1 - a) * beta
    return math.sqrt(step_alpha) * post_mean, step_alpha * post_var + beta, post_mean, post_var


@pytest.mark.parametrize("i", [0, 5, 9])
def test_eta1_equals_ddpm_step_then_forward_noising(i):
    alpha, alpha_prev = _tables(10)
    a, ap = alpha[i].item(), alpha_prev[i].item()
    c_eps, c_noise = sampling.fusion_coefficients(alpha.float(), alpha_prev.float(), 1.0)
    x = torch.tensor([[-1.3], [0.2], [0.9], [2.1]], dtype=torch.float64)  # 4 fixed (x, ê) pairs
    e = torch.tensor([[0.7], [-1.1], [0.4], [-0.2]], dtype=torch.float64)

    # analytic: the update is x − c_eps ê + c_noise z, z ~ N(0, 1)
    code_mean = x - c_eps[i].double() * e
    code_var = c_noise[i].double() ** 2
    ref_mean, ref_var, post_mean, post_var = _ddpm_then_forward(a, ap, x, e)
    torch.testing.assert_close(code_mean, ref_mean, atol=1e-6, rtol=1e-5)
    assert abs(code_var.item() - ref_var) <= 1e-5 * ref_var
    assert ref_var > 1e-4  # not a degenerate comparison

    # Monte Carlo with n samples per pair. Tolerances: 6 standard errors — mean: 6 sqrt(var / n);
    # variance: 6 var sqrt(2 / n) (Gaussian sample variance).
    n = 200_000
    g = torch.Generator().manual_seed(100 + i)
    z = torch.randn(4, n, generator=g, dtype=torch.float64)
    fused = sampling.fusion_update(x.float(), e.float(), z.float(), c_eps[i], c_noise[i]).double()
    n1 = torch.randn(4, n, generator=g, dtype=torch.float64)
    n2 = torch.randn(4, n, generator=g, dtype=torch.float64)
    x_prev = post_mean + math.sqrt(post_var) * n1
    renoised = math.sqrt(a / ap) * x_prev + math.sqrt(1 - a / ap) * n2
    mean_tol = 6 * math.sqrt(ref_var / n)
    var_tol = 6 * ref_var * math.sqrt(2 / n)
    for samples in (fused, renoised):
        assert (samples.mean(1, keepdim=True) - ref_mean).abs().max().item() < mean_tol
        assert (samples.var(1) - ref_var).abs().max().item() < var_tol


def test_eta0_is_identity():
    alpha, alpha_prev = _tables(50)
    c_eps, c_noise = sampling.fusion_coefficients(alpha.float(), alpha_prev.float(), 0.0)
    assert torch.equal(c_eps, torch.zeros_like(c_eps)) and torch.equal(c_noise, torch.zeros_like(c_noise))
    g = torch.Generator().manual_seed(2)
    x, e, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in (0, 25, 49):
        assert torch.equal(sampling.fusion_update(x, e, z, c_eps[i], c_noise[i]), x)
