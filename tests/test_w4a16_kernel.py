"""The Triton W4A16 GEMM against the torch reference: on the GPU when there is one, else in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), where only fp16 is trustworthy (DESIGN §5)."""
import pytest
import torch

from fourbit.formats.uint4 import quantize_groups
from fourbit.kernels.ref import w4a16_gemm_ref
from fourbit.kernels.w4a16_gemm import w4a16_gemm
from fourbit.nn.linear import SCALE_DTYPE, W4A16Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def _layer(n, k, group_size, sym, bias, gen):
    w = torch.randn(n, k, generator=gen)
    codes, scales, zeros = quantize_groups(w, group_size, sym, SCALE_DTYPE)
    b = torch.randn(n, generator=gen) if bias else None
    return W4A16Linear.from_codes(codes, scales, zeros, group_size, k, b).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size,sym", [(32, False), (64, True), (128, False), (-1, False), (-1, True)])
@pytest.mark.parametrize("m,n,k", [(1, 40, 172), (7, 72, 300), (16, 24, 128), (33, 130, 1000), (3, 8, 4104)])
def test_kernel_matches_reference(dtype, group_size, sym, m, n, k):
    if group_size > k:
        pytest.skip("group larger than K")
    gen = torch.Generator().manual_seed(hash((group_size, sym, m, n, k)) % 2**31)
    layer = _layer(n, k, group_size, sym, bias=m % 2 == 1, gen=gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    y = w4a16_gemm(x, layer.qweight, layer.scales, layer.zeros, group_size, n, k,
                   None if layer.bias is None else layer.bias.to(dtype))
    ref = w4a16_gemm_ref(x.double(), layer.qweight, layer.scales, layer.zeros, group_size, n, k,
                         None if layer.bias is None else layer.bias.double())
    assert y.dtype == dtype and y.shape == (m, n)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < (2e-3 if dtype == torch.float16 else 1e-2), err
