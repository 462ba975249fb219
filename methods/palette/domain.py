"""Where z comes from: deterministic standard-normal draws per (sample, draw index, seed), and domain steering's
Gaussian, fitted to one domain's encoded latents mu and saved as a safetensors file."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from latentkit.errors import ConfigError, DataError, writing
from latentkit.segments import Sample, SampleKey

if TYPE_CHECKING:
    from latentkit.methods.palette.method import Palette

Covariance = Literal["full", "diagonal"]


def draw_normal(key: SampleKey, draw: int, seed: int, shape: Sequence[int], stream: str = "prefix") -> Tensor:
    """N(0, I) values of `shape` (CPU, float32) for one sample's `draw`-th draw under `seed`: the same in every
    process, run and resume; `stream` keeps uses apart (the warm-up's draws are not the prompts')."""
    digest = hashlib.sha256(json.dumps([stream, seed, *key, draw]).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return torch.randn(tuple(shape), generator=generator)


@dataclass(frozen=True)
class DomainGaussian:
    """N(mean, factor factor^T): `factor` is [k, k] (full covariance) or [k] (the standard deviations)."""

    mean: Tensor
    factor: Tensor
    count: int  # how many latents it was fitted to

    @property
    def covariance(self) -> Tensor:
        if self.factor.dim() == 1:
            return torch.diag(self.factor.pow(2))
        return self.factor @ self.factor.T

    def transform(self, eps: Tensor) -> Tensor:
        """Standard-normal draws [..., k] -> draws of this Gaussian."""
        eps = eps.to(self.mean)
        spread = eps * self.factor if self.factor.dim() == 1 else eps @ self.factor.T
        return self.mean + spread

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"count": str(self.count), "latent_size": str(self.mean.shape[0])}
        with writing(path):
            save_file(
                {"mean": self.mean.contiguous(), "factor": self.factor.contiguous()}, str(path), metadata
            )

    @classmethod
    def load(cls, path: Path, latent_size: int) -> DomainGaussian:
        if not path.is_file():
            raise ConfigError(f"method.domain={path} does not exist; fit one with fit_domain first")
        with safe_open(str(path), framework="pt") as handle:
            mean, factor = handle.get_tensor("mean"), handle.get_tensor("factor")
            count = int(handle.metadata()["count"])
        if mean.shape[0] != latent_size:
            raise ConfigError(
                f"method.domain={path} is a Gaussian over {mean.shape[0]} latent dimensions but "
                f"method.latent_size={latent_size}; fit it again with this model"
            )
        return cls(mean, factor, count)


def fit_gaussian(latents: Tensor, covariance: Covariance) -> DomainGaussian:
    """Mean and unbiased (co)variance of latents [n, k]; a full covariance's factor is V sqrt(Lambda) from its
    eigendecomposition, exact also when fewer latents than dimensions leave it singular."""
    count = latents.shape[0]
    if count < 2:
        raise DataError(f"a domain Gaussian needs at least 2 samples, got {count}")
    latents = latents.double()
    mean = latents.mean(0)
    if covariance == "diagonal":
        return DomainGaussian(mean.float(), latents.std(0).float(), count)
    values, vectors = torch.linalg.eigh(torch.cov(latents.T).reshape(mean.shape[0], -1))
    return DomainGaussian(mean.float(), (vectors * values.clamp_min(0).sqrt()).float(), count)


def fit_domain(
    method: Palette, samples: Sequence[Sample], path: Path, batch_size: int = 16
) -> DomainGaussian:
    """Fit `method.config.domain_covariance`'s Gaussian to the encoded latents mu of one domain's samples and save
    it at `path` (e.g. inside the run); steer with `method.domain=<path>`."""
    gaussian = fit_gaussian(method.encode_samples(samples, batch_size), method.config.domain_covariance)
    gaussian.save(path)
    return gaussian


def domain_of(sample: Sample, domain_by: str) -> str | None:
    """The sample's domain under `domain_by` (`dataset` or `metadata.<field>`); None when the field is missing."""
    if domain_by == "dataset":
        return sample.dataset
    value = sample.metadata.get(domain_by.removeprefix("metadata."))
    return None if value is None else str(value)


def fit_domains(method: Palette, samples: Sequence[Sample], folder: Path, domain_by: str) -> dict[str, int]:
    """One Gaussian per domain with at least 2 samples, saved as `folder/<domain>.safetensors`; the sample
    count per domain fitted."""
    grouped: dict[str, list[Sample]] = {}
    for sample in samples:
        name = domain_of(sample, domain_by)
        if name is not None:
            grouped.setdefault(name, []).append(sample)
    fitted = {}
    for name, members in sorted(grouped.items()):
        if len(members) >= 2:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            fit_domain(method, members, folder / f"{safe}.safetensors")
            fitted[safe] = len(members)
    return fitted
