"""Gaussian diffusion as in improved DDPM / DiT: epsilon prediction with learned (interpolated
log-) variance, loss = MSE(eps) + VLB (mean stop-gradded), ancestral DDPM and DDIM samplers.

A process built from a subset of the base timesteps (respacing) keeps the base process's
alphas_cumprod at those steps and calls the model with the base timestep values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dis_dist.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from dis_dist.errors import ConfigError

Model = Callable[..., Tensor]
# One generator for the whole batch, or one per sample.
Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class MeanVariance:
    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor


def _extract(arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """arr[t] as like's dtype/device, broadcastable to like's shape."""
    out = arr.to(t.device)[t].to(like.dtype)
    return out.reshape(t.shape + (1,) * (like.ndim - t.ndim))


class GaussianDiffusion:
    """The diffusion process over ``len(betas)`` steps.

    learn_sigma: the model outputs 2C channels (eps, variance interpolation v in [-1, 1]);
    otherwise C channels (eps) and the fixed-large variance is used.
    timestep_map: for a respaced process, the base timestep of each of its steps.
    min_snr_gamma: > 0 weights each sample's MSE by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et
    al. 2023: low-noise steps count less); 0 leaves it unweighted, as DiT.
    """

    def __init__(
        self, betas: Tensor, *, learn_sigma: bool = True, timestep_map: Tensor | None = None,
        min_snr_gamma: float = 0.0,
    ) -> None:
        betas = betas.to(torch.float64)
        if len(betas) < 2:  # the posterior variance at t=1 is the first step's: there must be one
            raise ConfigError(f"a diffusion needs at least 2 steps, got {len(betas)} (sample.steps / --steps)")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.min_snr_gamma = min_snr_gamma
        self.timestep_map = (
            timestep_map if timestep_map is not None else torch.arange(self.num_timesteps)
        )
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, ac_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0: clip its log with the t=1 value.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac)
        # Fixed-large variance of models that do not learn sigma.
        self.fixed_variance = torch.cat([self.posterior_variance[1:2], betas[1:]])

    # -- forward process ----------------------------------------------------------------
    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample x_t ~ q(x_t | x_0)."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t),
            _extract(self.posterior_log_variance_clipped, t, x_t),
        )

    # -- the model's reverse process ----------------------------------------------------
    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timestep values the model sees (the base process's, under respacing)."""
        return self.timestep_map.to(t.device)[t]

    def split_output(self, model_output: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Model output -> (eps, variance, log_variance) for p(x_{t-1} | x_t)."""
        channels = x.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :channels], model_output[:, channels:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(torch.log(self.betas), t, x)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return eps, torch.exp(log_variance), log_variance
        eps = model_output[:, :channels]
        variance = _extract(self.fixed_variance, t, x).expand_as(x)
        return eps, variance, torch.log(variance)

    def p_mean_variance_from_output(
        self, model_output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> MeanVariance:
        eps, variance, log_variance = self.split_output(model_output, x, t)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return MeanVariance(mean, variance, log_variance, pred_xstart)

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> MeanVariance:
        out = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # -- training -----------------------------------------------------------------------
    def vb_terms_bpd(
        self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> Tensor:
        """Per-sample VLB term in bits/dim: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out.mean, log_scales=0.5 * out.log_variance
        )
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Model,
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses {"loss", "mse", "vb"}; "vb" only with learned sigma."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        out = out.float()
        channels = x_start.shape[1]
        eps = out[:, :channels]
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        mse = terms["mse"]
        if self.min_snr_gamma > 0:
            snr = _extract(self.alphas_cumprod / (1.0 - self.alphas_cumprod), t, mse)
            mse = mse * snr.clamp(max=self.min_snr_gamma) / snr
        if self.learn_sigma:
            # The VLB trains only the variance: the mean's gradient comes from the MSE alone.
            frozen = torch.cat([eps.detach(), out[:, channels:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    # -- sampling -----------------------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], like: Tensor, generator: Generators) -> Tensor:
        """Gaussian noise of ``shape``; with a list of generators, one per sample (row), so each
        sample's noise depends on its own generator only, not on the batch it is drawn in."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
            rows = [torch.randn(shape[1:], generator=g, device=g.device) for g in generator]
            return torch.stack(rows).to(like.device, like.dtype)
        gen_device = generator.device if generator is not None else like.device
        return torch.randn(shape, generator=generator, device=gen_device).to(like.device, like.dtype)

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: tuple[int, ...],
        *,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        device: torch.device | str = "cpu",
        generator: Generators = None,
        eta: float | None = None,
    ) -> Iterator[Tensor]:
        """Yield x_{t-1} for t = T-1..0: ancestral DDPM when ``eta`` is None, DDIM otherwise."""
        x = noise if noise is not None else self._noise(shape, torch.empty(0, device=device), generator)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
            if i > 0 and eta != 0:
                z = self._noise(shape, x, generator)
            else:  # the last step, or deterministic DDIM (eta 0: sigma * z is 0): no noise to draw
                z = torch.zeros_like(x)
            if eta is None:
                x = out.mean + torch.exp(0.5 * out.log_variance) * z
            else:
                eps = self.predict_eps_from_xstart(x, t, out.pred_xstart)
                ab = _extract(self.alphas_cumprod, t, x)
                ab_prev = _extract(self.alphas_cumprod_prev, t, x)
                sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
                mean = out.pred_xstart * ab_prev.sqrt() + torch.sqrt(1 - ab_prev - sigma**2) * eps
                x = mean + sigma * z
            yield x
