"""Noise samplers. The release uses :class:`SecureSampler`: uniforms from the operating system's CSPRNG
(``os.urandom``, the same source as ``secrets``), turned into Gaussian (Box–Muller) and Laplace (inverse CDF)
variates in float64.

[I] choice: a continuous float64 sampler fed by a CSPRNG rather than a discrete Gaussian. The noise must not
be predictable from a seed (a seeded PRNG such as numpy's PCG64 lets anyone who learns the seed subtract the
noise), and drawing from the OS CSPRNG removes that. Known residual gap: float64 arithmetic makes the
distribution only approximately Gaussian (Mironov, CCS 2012). The released sums are then rounded to float32
for the exported graph, which further blurs low-order bits, but this is not a proof; a discrete Gaussian
(Canonne, Kamath & Steinke 2020) would close the gap at a large cost in build time.

:class:`SeededSampler` exists for reproducible tests and benchmarks only; a release built with it reports
``sampler: "seeded (not private)"``.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

__all__ = ["NoiseSampler", "SecureSampler", "SeededSampler"]


class NoiseSampler(Protocol):
    name: str

    def normal(self, shape: tuple[int, ...], sigma: float) -> np.ndarray: ...

    def laplace(self, shape: tuple[int, ...], scale: float) -> np.ndarray: ...


class SecureSampler:
    """Gaussian and Laplace noise from ``os.urandom`` (53-bit uniforms in the open interval (0, 1))."""

    name = "os.urandom (CSPRNG) + Box-Muller / inverse CDF, float64"

    @staticmethod
    def uniform(n: int) -> np.ndarray:
        """(n,) float64 uniforms in (0, 1): 53 random bits plus one half-step, never 0 or 1."""
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return (bits.astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        n = int(np.prod(shape))
        m = (n + 1) // 2
        u1, u2 = self.uniform(m), self.uniform(m)
        rad = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([rad * np.cos(2 * np.pi * u2), rad * np.sin(2 * np.pi * u2)])[:n]
        return (sigma * z).reshape(shape)

    def laplace(self, shape: tuple[int, ...], scale: float) -> np.ndarray:
        n = int(np.prod(shape))
        u = self.uniform(n) - 0.5  # (-1/2, 1/2), never 0 in magnitude 1/2
        return (-scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))).reshape(shape)


class SeededSampler:
    """numpy PCG64 from a seed: reproducible, therefore NOT private. Tests and benchmarks only."""

    name = "seeded (not private)"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, shape: tuple[int, ...], sigma: float) -> np.ndarray:
        return self.rng.normal(0.0, sigma, size=shape)

    def laplace(self, shape: tuple[int, ...], scale: float) -> np.ndarray:
        return self.rng.laplace(0.0, scale, size=shape)
