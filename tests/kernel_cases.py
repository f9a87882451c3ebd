"""Inputs and tolerances shared by the kernel-backend tests (SPEC.md, "Tolerances that tests use")."""
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def planted_activations(m, k, dtype, threshold=6.0, n_outlier_cols=3, seed=0, device=DEVICE):
    """Gaussian activations with outlier columns (20-60), values exactly at +-threshold, a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if m and k:
        cols = torch.randperm(k, generator=g)[: min(n_outlier_cols, k)]
        rows = torch.randint(0, m, (cols.numel(),), generator=g)
        x[rows, cols] = (20 + 40 * torch.rand(cols.numel(), generator=g)) * torch.sign(torch.randn(cols.numel(), generator=g))
        x[torch.randint(0, m, (1,), generator=g), torch.randint(0, k, (1,), generator=g)] = threshold
        x[torch.randint(0, m, (1,), generator=g), torch.randint(0, k, (1,), generator=g)] = -threshold
        if m > 2:
            x[m // 2] = 0.0
    return x.to(dtype).to(device)


def random_weight(n, k, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(device)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each value (normal range; subnormals use the smallest)."""
    if dtype == torch.float32:
        raise ValueError("fp32 outputs use rtol, not ulps")
    bits = MANTISSA_BITS[dtype]
    smallest_normal = torch.finfo(dtype).tiny
    _, exponent = torch.frexp(values.float().abs().clamp_min(smallest_normal))
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), exponent - 1 - bits)


def assert_output_close(actual: torch.Tensor, expected: torch.Tensor):
    """SPEC.md: fp16/bf16 within 1 ulp + 1e-5 RMS; fp32 within rtol 1e-5, atol 1e-5 RMS; NaN where NaN."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.float(), expected.float()
    assert torch.equal(torch.isfinite(a), torch.isfinite(e)), "finite/non-finite pattern differs"
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    rms = e.pow(2).mean().sqrt()
    if expected.dtype == torch.float32:
        bound = 1e-5 * e.abs() + 1e-5 * rms
    else:
        bound = ulp(e, expected.dtype) + 1e-5 * rms
    excess = (a - e).abs() - bound
    assert excess.max() <= 0, f"max error {(a - e).abs().max().item():.3g} exceeds the SPEC bound"


def assert_quantized_equal(actual: torch.Tensor, expected: torch.Tensor):
    """Identical, except at most 1 in 10,000 elements may differ by +-1 (SPEC.md)."""
    assert actual.dtype == torch.int8 and actual.shape == expected.shape
    diff = (actual.int() - expected.int()).abs()
    if diff.numel():
        assert int(diff.max()) <= 1
    assert int((diff > 0).sum()) <= diff.numel() // 10_000
