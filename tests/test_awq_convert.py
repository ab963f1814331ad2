"""AutoAWQ GEMM tensors -> W4A16Linear: the dequantized weight must equal AutoAWQ's own, bit for bit."""
import pytest
import torch

from fourbit.errors import FourbitError
from fourbit.nn.linear import W4A16Linear
from quant_fixtures import unpack_awq_ref


def _awq_dequant_fp16(qweight, qzeros, scales, group_size):
    """AutoAWQ's dequantization written out independently: ((q - z) * s) in fp16 -> W (N, K)."""
    q, z = (t.t() for t in unpack_awq_ref(qweight, qzeros))  # (K, N), (G, N)
    k = q.shape[0]
    g = k if group_size == -1 else group_size
    zk, sk = z.repeat_interleave(g, 0), scales.repeat_interleave(g, 0)  # (K, N)
    return ((q - zk).half() * sk).t()


@pytest.mark.parametrize("k,n,group_size", [(256, 64, 128), (192, 40, 64), (96, 8, 32), (160, 24, -1)])
def test_from_awq_is_bit_exact(k, n, group_size):
    gen = torch.Generator().manual_seed(k * n)
    groups = 1 if group_size == -1 else k // group_size
    qweight = torch.randint(-2**31, 2**31, (k, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2**31, 2**31, (groups, n // 8), generator=gen, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-4).half()
    layer = W4A16Linear.from_awq(qweight, qzeros, scales, group_size)
    ref = _awq_dequant_fp16(qweight, qzeros, scales, group_size)
    assert torch.equal(layer.dequantize().half(), ref)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)


def test_from_awq_rejects_a_wrong_group_size():
    qweight = torch.zeros(256, 8, dtype=torch.int32)
    with pytest.raises(FourbitError, match="q_group_size"):
        W4A16Linear.from_awq(qweight, torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 64).half(), 64)
