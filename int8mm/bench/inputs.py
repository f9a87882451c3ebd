"""Benchmark inputs: N(0, 1) activations with planted outlier columns, and random weights.

LLM.int8() matters because large models carry a few activation feature columns with magnitudes far above
the rest; the planted columns reproduce that, so the outlier decomposition is timed, not skipped.
"""
import math
from dataclasses import dataclass

import torch

# nn.Linear's default init gives std ~ 1/sqrt(K); a fixed small std keeps every shape's weights alike
WEIGHT_STD = 0.02


@dataclass(frozen=True)
class OutlierSpec:
    """``count`` columns of every input row hold magnitudes uniform in ``[low, high]`` with random signs."""

    count: int = 8
    low: float = 20.0
    high: float = 60.0

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"outlier count must be >= 0, got {self.count}")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):  # inf magnitudes: NaN outputs and errors
            raise ValueError(f"outlier magnitudes must be finite, got low={self.low}, high={self.high}")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"outlier magnitudes need 0 <= low <= high, got low={self.low}, high={self.high}")


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def planted_activations(m: int, k: int, outliers: OutlierSpec, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator) -> torch.Tensor:
    """``[m, k]`` activations in ``dtype``: N(0, 1) plus ``outliers.count`` planted outlier columns."""
    x = torch.randn(m, k, device=device, generator=generator)
    count = min(outliers.count, k)
    if count and m:
        cols = torch.randperm(k, device=device, generator=generator)[:count]
        span = outliers.high - outliers.low
        magnitude = outliers.low + span * torch.rand(m, count, device=device, generator=generator)
        sign = torch.randint(0, 2, (m, count), device=device, generator=generator) * 2 - 1
        x[:, cols] = magnitude * sign
    return x.to(dtype)


def random_weight(n: int, k: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``[n, k]`` weight, N(0, WEIGHT_STD^2): the master copy every provider is built from."""
    return torch.randn(n, k, device=device, generator=generator) * WEIGHT_STD
