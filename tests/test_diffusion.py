"""Gaussian diffusion against closed forms: schedule, posterior, VLB, respacing, samplers, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dis_dist.diffusion import create_diffusion, guided_model, space_timesteps
from dis_dist.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl
from dis_dist.diffusion.sampling import sample
from dis_dist.errors import ConfigError


def test_linear_schedule_endpoints():
    d = create_diffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert torch.all(d.betas[1:] > d.betas[:-1])


def test_posterior_is_gaussian_conditioning_of_the_forward_process():
    """q(x_{t-1} | x_t, x_0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0."""
    d = create_diffusion()
    x0, xt = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 500, 999])
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
    for i, step in enumerate(t.tolist()):
        ab, ab_prev = d.alphas_cumprod[step].item(), d.alphas_cumprod[step - 1].item()
        alpha = 1 - d.betas[step].item()
        mu1, mu2 = math.sqrt(ab_prev) * x0[i], math.sqrt(ab) * x0[i]
        s11, s12, s22 = 1 - ab_prev, math.sqrt(alpha) * (1 - ab_prev), 1 - ab
        assert torch.allclose(mean[i], mu1 + s12 / s22 * (xt[i] - mu2), rtol=1e-10)
        assert var[i].flatten()[0].item() == pytest.approx(s11 - s12**2 / s22, rel=1e-10)
        assert log_var[i].flatten()[0].item() == pytest.approx(math.log(s11 - s12**2 / s22), rel=1e-10)


def test_q_sample_moments():
    d = create_diffusion()
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    ab = d.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    lv1, lv2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10)


def _exact_discretized_nll(x, mean, log_scale):
    """Exact (erf-based) version of the 256-bin discretised Gaussian NLL, in nats."""
    dist = Normal(mean, log_scale.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), dist.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), dist.cdf(x - 1 / 255))
    return -torch.log(upper - lower)


def test_vlb_at_t0_is_the_decoder_nll_and_kl_after():
    d = create_diffusion()
    torch.manual_seed(1)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1)
    noise = torch.randn_like(x0)
    out = torch.cat([torch.randn_like(x0) * 0.1, torch.rand_like(x0) * 2 - 1], 1)
    t0 = torch.zeros(3, dtype=torch.long)
    xt = d.q_sample(x0, t0, noise)
    vb = d.vb_terms_bpd(out, x0, xt, t0)
    p = d.p_mean_variance_from_output(out, xt, t0)
    nll = _exact_discretized_nll(x0, p.mean, 0.5 * p.log_variance).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(vb, nll, rtol=2e-2)  # the tanh CDF approximation of improved DDPM
    approx = -discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
    assert torch.allclose(approx.mean(dim=(1, 2, 3)) / math.log(2), vb, rtol=1e-10)
    t = torch.full((3,), 10)
    xt = d.q_sample(x0, t, noise)
    true_mean, _, true_lv = d.q_posterior_mean_variance(x0, xt, t)
    p = d.p_mean_variance_from_output(out, xt, t)
    kl = normal_kl(true_mean, true_lv, p.mean, p.log_variance).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(d.vb_terms_bpd(out, x0, xt, t), kl, rtol=1e-10)


def test_learned_variance_interpolates_between_the_bounds():
    d = create_diffusion()
    x = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    t = torch.tensor([50, 50])
    eps = torch.zeros_like(x)
    out = torch.cat([eps, torch.tensor([-1.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)], 1)
    _, _, log_var = d.split_output(out, x, t)
    assert log_var[0].item() == pytest.approx(d.posterior_log_variance_clipped[50].item())
    assert log_var[1].item() == pytest.approx(math.log(d.betas[50].item()))


def test_training_losses_terms_and_stop_gradient():
    d = create_diffusion()
    x0 = torch.randn(4, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 500, 999])
    out = torch.randn(4, 4, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, ts: out, x0, t, noise=noise)
    assert torch.allclose(terms["mse"], ((noise - out[:, :2]) ** 2).mean(dim=(1, 2, 3)))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.count_nonzero(grad[:, :2]) == 0  # the VLB does not move the mean
    assert torch.count_nonzero(grad[:, 2:]) > 0
    fixed = create_diffusion(learn_sigma=False)
    terms = fixed.training_losses(lambda x, ts: out[:, :2], x0, t, noise=noise)
    assert set(terms) == {"loss", "mse"}


def test_min_snr_weights_the_mse_only():
    """Min-SNR: the MSE of step t counts min(SNR_t, gamma) / SNR_t; high-noise steps (SNR below gamma)
    keep weight 1; "mse" stays the unweighted term; the VLB is untouched."""
    x0 = torch.randn(4, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 50, 500, 999])
    out = torch.randn(4, 4, 4, 4)
    plain = create_diffusion().training_losses(lambda x, ts: out, x0, t, noise=noise)
    d = create_diffusion(min_snr_gamma=5.0)
    terms = d.training_losses(lambda x, ts: out, x0, t, noise=noise)
    ac = d.alphas_cumprod[t]
    snr = ac / (1 - ac)
    weight = (snr.clamp(max=5.0) / snr).float()
    assert weight[0] < 1e-3 and weight[-1] == 1.0  # t=0: SNR ~1e4; t=999: SNR ~4e-5
    assert torch.equal(terms["mse"], plain["mse"])
    assert torch.equal(terms["vb"], plain["vb"])
    assert torch.allclose(terms["loss"], weight * plain["mse"] + plain["vb"])


def test_space_timesteps_and_respacing_keep_alphas_cumprod():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(100, "10,5") == sorted(set(space_timesteps(100, "10,5")))
    assert len(space_timesteps(100, "10,5")) == 15
    base, spaced = create_diffusion(), create_diffusion("25")
    keep = space_timesteps(1000, 25)
    assert spaced.num_timesteps == 25
    assert torch.allclose(spaced.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)
    assert spaced.model_timesteps(torch.tensor([0, 24])).tolist() == [0, 999]
    for bad in ("ddim7x", "abc", "2000"):
        with pytest.raises(ConfigError):
            space_timesteps(1000, bad)


class _Oracle:
    """The exact eps-predictor for data that is a single point x*: eps = (x_t - sqrt(ab) x*) / sqrt(1-ab)."""

    def __init__(self, diffusion, target, learn_sigma=True):
        self.d, self.target, self.learn_sigma = diffusion, target, learn_sigma

    def __call__(self, x, t, y=None):
        base = create_diffusion()  # t arrives as base-process timesteps
        ab = base.alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.target) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_recover_a_point_mass(sampler):
    target = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    d = create_diffusion("ddim50" if sampler == "ddim" else "100")
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    out = sample(_Oracle(d, target), d, noise, sampler=sampler, generator=torch.Generator().manual_seed(0))
    tol = 1e-6 if sampler == "ddim" else 2e-2
    assert torch.allclose(out, target.expand_as(out), atol=tol)


def test_deterministic_ddim_draws_no_noise():
    """DDIM with eta 0 adds sigma * z = 0: no noise is drawn (the generators are untouched) and
    the samples are bit for bit those of a loop that draws it (eta 1e-300: sigma * z vanishes
    in the sum)."""
    d = create_diffusion("ddim10")
    model = _Oracle(d, torch.full((1, 1, 2, 2), 0.3, dtype=torch.float64))
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    states = [g.get_state() for g in gens]
    fast = sample(model, d, noise, sampler="ddim", ddim_eta=0.0, generator=gens)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))
    drawn = sample(model, d, noise, sampler="ddim", ddim_eta=1e-300, generator=gens)
    assert not all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))
    assert torch.equal(fast, drawn)


def test_sampling_is_deterministic_given_the_generator():
    d = create_diffusion("10")
    model = _Oracle(d, torch.zeros(1, 1, 2, 2))
    noise = torch.randn(2, 1, 2, 2)
    a = sample(model, d, noise, generator=torch.Generator().manual_seed(3))
    b = sample(model, d, noise, generator=torch.Generator().manual_seed(3))
    c = sample(model, d, noise, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _two_headed_model(x, t, y):
    """eps = label-dependent constant; variance channels = label too."""
    value = y.to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([value.expand_as(x), value.expand_as(x)], 1)


def test_guidance_scale_reaches_the_output():
    x, t, y = torch.zeros(2, 4, 2, 2), torch.tensor([5, 5]), torch.tensor([3, 1])
    null = 10
    for scale in (1.0, 1.5, 4.0):
        out = guided_model(_two_headed_model, scale, null_class=null, in_channels=4)(x, t, y)
        expected_eps = null + scale * (y.float() - null)
        assert torch.allclose(out[:, :4], expected_eps.view(-1, 1, 1, 1).expand(2, 4, 2, 2))
        assert torch.allclose(out[:, 4:], y.float().view(-1, 1, 1, 1).expand(2, 4, 2, 2))
    dit = guided_model(_two_headed_model, 4.0, null_class=null, in_channels=4, channels="first3")(x, t, y)
    assert torch.allclose(dit[:, 3], y.float().view(-1, 1, 1).expand(2, 2, 2))  # 4th eps channel unguided
    assert not torch.allclose(dit[:, :3], y.float().view(-1, 1, 1, 1).expand(2, 3, 2, 2))
    with pytest.raises(ConfigError):
        guided_model(_two_headed_model, 2.0, null_class=null, in_channels=4, channels="some")


def test_guidance_interval_guides_only_its_timesteps():
    """Inside [lo, hi) the guided eps; outside it the conditional output alone, from one forward
    pass (no null-class batch); a batch straddling the bound gets each sample's own."""
    x, y = torch.zeros(2, 4, 2, 2), torch.tensor([3, 1])
    null, scale = 10, 4.0
    batches = []

    def model(x, t, y):
        batches.append(len(y))
        return _two_headed_model(x, t, y)

    f = guided_model(model, scale, null_class=null, in_channels=4, interval=(100, 700))
    guided_eps = (null + scale * (y.float() - null)).view(-1, 1, 1, 1)
    cond_eps = y.float().view(-1, 1, 1, 1)
    for step, inside in ((99, False), (100, True), (699, True), (700, False)):
        batches.clear()
        out = f(x, torch.tensor([step, step]), y)
        assert torch.allclose(out[:, :4], (guided_eps if inside else cond_eps).expand(2, 4, 2, 2))
        assert torch.allclose(out[:, 4:], cond_eps.expand(2, 4, 2, 2))
        assert batches == ([4] if inside else [2])
    mixed = f(x, torch.tensor([50, 500]), y)
    assert torch.allclose(mixed[0, :4], cond_eps[0].expand(4, 2, 2))
    assert torch.allclose(mixed[1, :4], guided_eps[1].expand(4, 2, 2))
    with pytest.raises(ConfigError):
        guided_model(model, scale, null_class=null, in_channels=4, interval=(500, 500))


def test_guided_sampling_differs_from_unguided():
    d = create_diffusion("5")
    from dis_dist.models import build_model

    model = build_model("DiS-T/8", input_size=16, in_channels=1, num_classes=3, scan_backend="chunked").eval()
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_(0, 0.05)
    noise, labels = torch.randn(2, 1, 16, 16), torch.tensor([0, 2])
    kw = dict(labels=labels, null_class=3, generator=torch.Generator().manual_seed(0))
    plain = sample(model, d, noise, cfg_scale=1.0, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    guided = sample(model, d, noise, cfg_scale=4.0, **kw)
    assert (plain - guided).abs().max() > 1e-3
