"""The reference cache's 16-bit rows: within half a step of the float32 log-probabilities, and
KL divergences from them within a hair of the exact ones."""

from __future__ import annotations

import torch

from lowbit.evaluation.reference import CODE_RANGE, decode_rows, encode_rows


def _logprobs(n: int, vocab: int, temperature: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n, vocab, generator=g) * temperature, dim=-1)


def test_rows_decode_within_half_a_step() -> None:
    lp = _logprobs(64, 5000, 6.0, 0)
    codes, lo, step = encode_rows(lp)
    assert codes.dtype.name == "uint16" and codes.shape == (64, 5000)
    back = decode_rows(codes, lo, step)
    kept = lp >= (lp.amax(-1, keepdim=True) - CODE_RANGE)
    err = (back - lp).abs()
    # half a step of rounding, and the renormalization's shift of the row (a fraction of a step)
    assert float(err[kept].max()) <= float(step.max())
    assert float(step.max()) <= CODE_RANGE / 65535 * 1.0001
    # below the range, values are clamped to its bottom: no larger than the real probability's e^-40
    assert bool((back[~kept] >= lp[~kept]).all()) and (not bool((~kept).any()) or float(back[~kept].exp().max()) < 1e-17)


def test_kl_divergence_from_16_bit_rows() -> None:
    ref = _logprobs(256, 20000, 4.0, 1)
    # a near model (KLD 1.7e-4, flat rows: the hardest case for rounding) and a far one (KLD 0.04)
    for noise, tolerance in ((0.02, 0.02), (0.3, 1e-3)):
        model = torch.log_softmax(ref + noise * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
        exact = float((ref.exp() * (ref - model)).sum(-1).double().mean())
        a = decode_rows(*encode_rows(ref))
        approx = float((a.exp() * (a - model)).sum(-1).double().mean())
        assert abs(approx - exact) < tolerance * exact, (noise, exact, approx)
    # float16 rows, for comparison, are further off
    half = ref.half().float()
    near = torch.log_softmax(ref + 0.02 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)), -1)
    exact = float((ref.exp() * (ref - near)).sum(-1).double().mean())
    a16 = decode_rows(*encode_rows(ref))
    assert abs(float((a16.exp() * (a16 - near)).sum(-1).double().mean()) - exact) < abs(
        float((half.exp() * (half - near)).sum(-1).double().mean()) - exact)
