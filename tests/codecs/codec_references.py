"""Reference helpers shared by the codec tests: test data and float64 reference computations."""

from __future__ import annotations

import torch

from lowbit.codecs import Codec

# OCP E2M1 magnitudes, codes 0..7.
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def student_t(shape: tuple[int, int], df: int, seed: int) -> torch.Tensor:
    """Heavy-tailed test weights: Student-t with ``df`` degrees of freedom, seeded."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df, *shape), generator=g).square().mean(dim=0)
    return z / chi2.sqrt()


def ref_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (float64), ties to even mantissa, saturating, sign kept."""
    vals = torch.tensor(E2M1, dtype=torch.float64)
    a = y.to(torch.float64).abs().clamp(max=6.0).reshape(-1, 1)
    dist = (a - vals).abs()
    score = (dist == dist.min(1, keepdim=True).values).to(torch.int64) * 2 + (torch.arange(8) % 2 == 0).to(torch.int64)
    mag = vals[score.argmax(1)]
    return torch.where(torch.signbit(y.reshape(-1)), -mag, mag).reshape(y.shape)


def weighted_group_error(codec: Codec, groups: torch.Tensor, weights: torch.Tensor,
                         scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float64 importance-weighted squared error of each group ``(R, G)`` under ``scale``."""
    d = codec.quantize_dequantize(groups, scale).to(torch.float64) - groups.to(torch.float64)
    return (d.square() * weights.to(torch.float64)).sum(-1)


def per_value_importance(codec: Codec, weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``codec.importance_weights`` of ``importance`` (per input column) for ``weight``, back in
    the ``(out, in)`` layout of ``weight``."""
    g = codec.grouping
    groups = g.split(weight)
    per_value = codec.importance_weights(groups, g.weights(tuple(weight.shape), importance))
    return g.merge(torch.broadcast_to(per_value, groups.shape), tuple(weight.shape))
