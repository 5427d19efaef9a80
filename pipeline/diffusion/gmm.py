"""Gaussian mixtures under a VP / Ornstein–Uhlenbeck forward diffusion, in closed form.

If the data is a k-mixture ``p_0 = Σ_i α_i N(μ_i, Σ_i)`` and the forward process is ``x_t = a_t x_0 + b_t z``
(``a_t = e^{-s(t)}``, ``b_t = sqrt(1 - e^{-2 s(t)})``), every marginal is again a k-mixture
``p_t = Σ_i α_i N(a_t μ_i, a_t² Σ_i + b_t² I)`` (arXiv 2405.16418 [C]). Its score and Hessian are

    ∇log p_t(x)  = Σ_i w_i(x) g_i(x),            g_i = -Σ_{i,t}⁻¹ (x - a_t μ_i),  w = softmax_i(log α_i + log N_i(x))
    ∇²log p_t(x) = -Σ_i w_i Σ_{i,t}⁻¹ + Cov_w(g)

computed here in float64 through one eigendecomposition per component (``Σ_i = U_i Λ_i U_iᵀ`` gives
``Σ_{i,t} = U_i (a_t² Λ_i + b_t²) U_iᵀ`` for every t at once) and a log-sum-exp over components, so nothing
overflows for far-away points or many components.

Time: ``s(t) = ½ ∫_0^t β(u) du`` is the OU-time of a VP schedule; ``ou`` is β ≡ 2 (so s = t, the DDPM-theory
convention of arXiv 2405.16418), ``vp-linear`` is β(t) = β_min + (β_max - β_min) t (DDPM's linear schedule on t ∈ [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["GaussianMixture", "Schedule", "as_time"]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Schedule:
    """A variance-preserving forward schedule ``x_t = a_t x_0 + b_t z``.

    Args:
        kind: ``"ou"`` (β ≡ 2: a_t = e^{-t}) or ``"vp-linear"`` (β(t) = beta_min + (beta_max - beta_min) t).
        beta_min, beta_max: the linear schedule's endpoints (ignored for ``ou``).
    """

    kind: Literal["ou", "vp-linear"] = "ou"
    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if self.kind not in ("ou", "vp-linear"):
            raise ValueError(f"schedule kind must be 'ou' or 'vp-linear', got {self.kind!r}")
        if self.kind == "vp-linear" and not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"vp-linear needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def s(self, t: Tensor) -> Tensor:
        """OU time ``½ ∫_0^t β``: a_t = e^{-s}."""
        if self.kind == "ou":
            return t
        return 0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def t_of_s(self, s: Tensor) -> Tensor:
        """Inverse of :meth:`s` (s ≥ 0)."""
        if self.kind == "ou":
            return s
        c = 0.5 * (self.beta_max - self.beta_min)
        if c == 0:
            return 2 * s / self.beta_min
        # ½(β_min t + c t²) = s  ->  c t² + β_min t - 2 s = 0
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 8 * c * s)) / (2 * c)

    def alpha(self, t: Tensor) -> Tensor:
        """a_t = e^{-s(t)} (signal scale)."""
        return torch.exp(-self.s(t))

    def sigma(self, t: Tensor) -> Tensor:
        """b_t = sqrt(1 - e^{-2 s(t)}) (noise scale), via expm1 so small t keeps its digits."""
        return torch.sqrt(-torch.expm1(-2 * self.s(t)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "beta_min": self.beta_min, "beta_max": self.beta_max}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        return cls(**{k: data[k] for k in ("kind", "beta_min", "beta_max") if k in data})


def as_time(t: Any, n: int, *, dtype: torch.dtype = torch.float64) -> Tensor:
    """t as an (n,) tensor (a scalar is broadcast)."""
    t = torch.as_tensor(t, dtype=dtype)
    return t.expand(n).clone() if t.ndim == 0 else t.reshape(n).to(dtype)


@dataclass(frozen=True)
class GaussianMixture:
    """``p_0 = Σ_i α_i N(μ_i, Σ_i)`` in d dimensions, float64.

    Args:
        weights: (k,) mixture weights α, positive, summing to 1.
        means: (k, d) component means μ_i.
        covs: (k, d, d) symmetric positive-definite covariances Σ_i.

    Raises:
        ValueError: shapes disagree, weights not a distribution, a covariance not SPD, or non-finite values.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self) -> None:
        w, m, c = (torch.as_tensor(x, dtype=torch.float64) for x in (self.weights, self.means, self.covs))
        if m.ndim != 2 or w.shape != (m.shape[0],) or c.shape != (m.shape[0], m.shape[1], m.shape[1]):
            raise ValueError(
                f"need weights (k,), means (k, d), covs (k, d, d); got {tuple(w.shape)}, {tuple(m.shape)}, {tuple(c.shape)}"
            )
        if not all(torch.isfinite(x).all() for x in (w, m, c)):
            raise ValueError("mixture parameters must be finite")
        if (w <= 0).any() or abs(float(w.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be positive and sum to 1 (sum {float(w.sum()):.6g})")
        if not torch.allclose(c, c.transpose(1, 2), atol=1e-10 * max(1.0, float(c.abs().max()))):
            raise ValueError("covariances must be symmetric")
        lam, U = torch.linalg.eigh(0.5 * (c + c.transpose(1, 2)))
        if (lam <= 0).any():
            raise ValueError(f"covariances must be positive definite (smallest eigenvalue {float(lam.min()):.3g})")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)
        object.__setattr__(self, "_eig", (lam, U))  # (k, d), (k, d, d): Σ_i = U diag(λ) Uᵀ

    # ------------------------------------------------------------------ construction / serialization
    @property
    def k(self) -> int:
        return int(self.means.shape[0])

    @property
    def d(self) -> int:
        return int(self.means.shape[1])

    @property
    def eigvals(self) -> Tensor:
        """(k, d) eigenvalues of each Σ_i (ascending)."""
        return self._eig[0]  # type: ignore[attr-defined]

    def shared_covariance(self) -> bool:
        """True when every component has the same Σ (the Lipschitz bound then holds on all of ℝ^d)."""
        return bool(torch.allclose(self.covs, self.covs[:1].expand_as(self.covs), rtol=1e-12, atol=1e-12))

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GaussianMixture:
        """From ``{"weights": [...], "means": [[...]], "covs": [[[...]]]}`` (``covs`` may also be a list of
        per-component variances ``"stds"`` for isotropic components)."""
        means = torch.as_tensor(data["means"], dtype=torch.float64)
        if "covs" in data:
            covs = torch.as_tensor(data["covs"], dtype=torch.float64)
        else:
            std = torch.as_tensor(data["stds"], dtype=torch.float64).reshape(-1)
            covs = (std**2)[:, None, None] * torch.eye(means.shape[1], dtype=torch.float64)
        weights = torch.as_tensor(data.get("weights", [1.0 / len(means)] * len(means)), dtype=torch.float64)
        return cls(weights, means, covs)

    @classmethod
    def random(
        cls,
        k: int,
        d: int,
        *,
        generator: torch.Generator | None = None,
        spread: float = 2.0,
        shared: bool = False,
        scale: tuple[float, float] = (0.1, 1.0),
    ) -> GaussianMixture:
        """A random mixture (Dirichlet weights, Gaussian means of std ``spread``, random SPD covariances with
        eigenvalues in ``scale``); ``shared=True`` gives every component one covariance."""
        g = generator
        w = (
            torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample()
            if g is None
            else _dirichlet(k, g)
        )
        means = spread * torch.randn(k, d, dtype=torch.float64, generator=g)
        n_cov = 1 if shared else k
        q, _ = torch.linalg.qr(torch.randn(n_cov, d, d, dtype=torch.float64, generator=g))
        lam = scale[0] + (scale[1] - scale[0]) * torch.rand(n_cov, d, dtype=torch.float64, generator=g)
        covs = q @ torch.diag_embed(lam) @ q.transpose(1, 2)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        return cls(w, means, covs.expand(k, d, d).clone())

    # ------------------------------------------------------------------ the diffusion marginals
    def _parts(self, x: Tensor, t: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(log α_i + log N_i(x)) (n, k), y = Uᵀ(x - a μ_i) (n, k, d), λ_t (n, k, d), U (k, d, d)."""
        lam, U = self._eig  # type: ignore[attr-defined]
        n = x.shape[0]
        t = as_time(t, n)
        a = schedule.alpha(t)[:, None, None]  # (n, 1, 1)
        b2 = schedule.sigma(t)[:, None, None] ** 2
        lam_t = a * a * lam[None] + b2  # (n, k, d): eigenvalues of Σ_{i,t}
        diff = x[:, None, :] - a * self.means[None]  # (n, k, d)
        y = torch.einsum("kde,nkd->nke", U, diff)  # (n, k, d): coordinates in Σ_i's eigenbasis
        logn = -0.5 * ((y * y / lam_t).sum(-1) + torch.log(lam_t).sum(-1) + self.d * math.log(2 * math.pi))
        return torch.log(self.weights)[None] + logn, y, lam_t, U

    def log_prob(self, x: Tensor, t: Any = 0.0, schedule: Schedule = Schedule()) -> Tensor:
        """log p_t(x) for x (n, d) and t scalar or (n,); returns (n,)."""
        logc, *_ = self._parts(x.to(torch.float64), t, schedule)
        return torch.logsumexp(logc, dim=1)

    def score(self, x: Tensor, t: Any = 0.0, schedule: Schedule = Schedule()) -> Tensor:
        """∇_x log p_t(x), (n, d)."""
        logc, y, lam_t, U = self._parts(x.to(torch.float64), t, schedule)
        w = torch.softmax(logc, dim=1)  # (n, k) responsibilities
        g = -torch.einsum("kde,nke->nkd", U, y / lam_t)  # (n, k, d): -Σ_{i,t}⁻¹ (x - a μ_i)
        return torch.einsum("nk,nkd->nd", w, g)

    def hessian(self, x: Tensor, t: Any = 0.0, schedule: Schedule = Schedule()) -> Tensor:
        """∇²_x log p_t(x), (n, d, d): -Σ_i w_i Σ_{i,t}⁻¹ + Cov_w(g)."""
        logc, y, lam_t, U = self._parts(x.to(torch.float64), t, schedule)
        w = torch.softmax(logc, dim=1)
        g = -torch.einsum("kde,nke->nkd", U, y / lam_t)
        prec = torch.einsum("kde,nke,kfe->nkdf", U, 1.0 / lam_t, U)  # (n, k, d, d): Σ_{i,t}⁻¹
        mean_g = torch.einsum("nk,nkd->nd", w, g)
        second = torch.einsum("nk,nkd,nkf->ndf", w, g, g)
        return -torch.einsum("nk,nkdf->ndf", w, prec) + second - mean_g[:, :, None] * mean_g[:, None, :]

    def marginal(self, t: float, schedule: Schedule = Schedule()) -> GaussianMixture:
        """p_t as a mixture: weights α, means a_t μ_i, covariances a_t² Σ_i + b_t² I."""
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, b = float(schedule.alpha(tt)), float(schedule.sigma(tt))
        eye = torch.eye(self.d, dtype=torch.float64)
        return GaussianMixture(self.weights, a * self.means, a * a * self.covs + b * b * eye)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n draws from p_0, (n, d) float64."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        lam, U = self._eig  # type: ignore[attr-defined]
        z = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        return self.means[comp] + torch.einsum("nde,ne->nd", U[comp], z * lam[comp].sqrt())

    def sample_t(
        self, t: Tensor, *, generator: torch.Generator | None = None, schedule: Schedule = Schedule()
    ) -> Tensor:
        """One draw of x_t ~ p_t per entry of t (n,): a_t x_0 + b_t z, (n, d)."""
        x0 = self.sample(t.shape[0], generator=generator)
        z = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        return schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * z


def _dirichlet(k: int, g: torch.Generator) -> Tensor:
    """Dirichlet(1, ..., 1) from a seeded generator: normalized exponentials."""
    e = -torch.log(torch.rand(k, dtype=torch.float64, generator=g).clamp_min(1e-300))
    return e / e.sum()
