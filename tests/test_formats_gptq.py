"""fourbit.formats.gptq: the GPTQ v1 pack/unpack pair against a word-by-word packer written from the layout."""
import pytest
import torch

from fourbit.errors import FourbitError
from fourbit.formats.gptq import default_g_idx, pack_gptq, unpack_gptq
from fourbit.formats.uint4 import quantize_groups


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _slow_pack(codes, zeros):
    """GPTQ v1 from its definition: qweight[r, n] nibble j = q[n, 8r + j]; qzeros[g, c] nibble j = z[8c + j, g] - 1."""
    n, k = codes.shape
    g = zeros.shape[1]
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    qzeros = torch.zeros(g, n // 8, dtype=torch.int64)
    for r in range(k // 8):
        for col in range(n):
            for j in range(8):
                qweight[r, col] |= int(codes[col, 8 * r + j]) << (4 * j)
    for gi in range(g):
        for c in range(n // 8):
            for j in range(8):
                qzeros[gi, c] |= (int(zeros[8 * c + j, gi]) - 1) << (4 * j)
    return _to_int32(qweight), _to_int32(qzeros)


def test_hand_built_words():
    codes = torch.arange(1, 9, dtype=torch.uint8)[None, :].repeat(8, 1)  # (N=8, K=8): row k holds code k + 1
    zeros = torch.tensor([[16], [1], [1], [1], [1], [1], [1], [10]], dtype=torch.uint8)
    qweight, qzeros, s, g_idx = pack_gptq(codes, torch.ones(8, 1), zeros, default_g_idx(8, -1))
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 8)
    assert (qweight == 0x87654321 - 2**32).all()  # nibble j holds input channel j: codes 1..8
    assert qzeros.shape == (1, 1) and int(qzeros[0, 0]) == 0x9000000F - 2**32  # zero - 1: 15 at nibble 0, 9 at 7
    assert s.dtype == torch.float16 and s.shape == (1, 8) and g_idx.dtype == torch.int32
    c2, s2, z2, g2 = unpack_gptq(qweight, qzeros, s, g_idx)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(g2, torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("n,k,group_size", [(16, 64, 32), (24, 96, -1), (8, 160, 64)])
def test_matches_slow_packer(n, k, group_size):
    gen = torch.Generator().manual_seed(n + k)
    groups = 1 if group_size == -1 else -(-k // group_size)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(1, 17, (n, groups), generator=gen, dtype=torch.uint8)
    qweight, qzeros, _, _ = pack_gptq(codes, torch.rand(n, groups), zeros, default_g_idx(k, group_size))
    ref_w, ref_z = _slow_pack(codes, zeros)
    assert torch.equal(qweight, ref_w) and torch.equal(qzeros, ref_z)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_round_trip(sym, act_order):
    n, k, gs = 40, 256, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    codes, scales, zeros = quantize_groups(w, gs, sym)
    if zeros is not None:
        zeros = zeros.clamp(min=1)  # v1 cannot store 0 (tested below)
    g_idx = default_g_idx(k, gs)
    if act_order:  # any assignment of channels to groups: a shuffled g_idx
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(4))]
    qweight, qzeros, s16, g32 = pack_gptq(codes, scales, zeros, g_idx)
    assert qweight.shape == (k // 8, n) and qzeros.shape == (k // gs, n // 8) and s16.shape == (k // gs, n)
    c2, s2, z2, g2 = unpack_gptq(qweight, qzeros, s16, g32)
    assert torch.equal(c2, codes) and torch.equal(s2, scales.half()) and torch.equal(g2, g_idx.long())
    assert torch.equal(z2, torch.full_like(s2, 8, dtype=torch.uint8) if sym else zeros)
    if sym:
        assert (qzeros == 0x77777777).all()  # symmetric v1 checkpoints store 7


def test_unpack_without_g_idx_uses_group_size():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    qweight, qzeros, s, _ = pack_gptq(codes, torch.ones(8, 2), None, default_g_idx(64, 32))
    _, _, _, g = unpack_gptq(qweight, qzeros, s, None, group_size=32)
    assert torch.equal(g, torch.arange(64) // 32)
    with pytest.raises(FourbitError, match="group_size"):
        unpack_gptq(qweight, qzeros, s)


def test_errors():
    codes = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(FourbitError, match="1..16"):
        pack_gptq(codes, torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.uint8), default_g_idx(64, 32))
    with pytest.raises(FourbitError, match="multiples of 8"):
        pack_gptq(torch.zeros(8, 60, dtype=torch.uint8), torch.ones(8, 2), None, default_g_idx(60, 32))
    with pytest.raises(FourbitError, match="groups"):
        pack_gptq(codes, torch.ones(8, 2), None, default_g_idx(64, 16))
    qweight, qzeros, s, g = pack_gptq(codes, torch.ones(8, 2), None, default_g_idx(64, 32))
    with pytest.raises(FourbitError, match="GPTQ v1"):
        unpack_gptq(qweight, qzeros[:, :0], s, g)
    with pytest.raises(FourbitError, match="g_idx"):
        unpack_gptq(qweight, qzeros, s, g[:32])
