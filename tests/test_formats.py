"""Round trips and layout checks for fourbit.formats (uint4 groups, AWQ GEMM, quick)."""
import pytest
import torch

from fourbit.errors import FourbitError
from fourbit.formats.awq import pack_awq, unpack_awq
from fourbit.formats.quick import K_TILE, N_TILE, pack_quick, qweight_shape, unpack_quick
from fourbit.formats.uint4 import dequantize_groups, pad_to, quantize_groups

SHAPES = [(172, 64), (64, 172), (13, 300), (256, 4096), (8, 32)]
GROUPS = [32, 64, 128, -1]


def _weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # per-row magnitudes spread over 1e-3..1e1 so scales differ, plus a few outliers
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None]
    w[torch.rand(n, k, generator=g) < 0.01] *= 20
    return w.to(dtype)


def _expand(scales, k, group_size):  # (N, G) -> (N, k): each column's scale
    gs = k if group_size == -1 else group_size
    return scales.repeat_interleave(gs, dim=1)[:, :k]


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_error_bound(shape, group_size, sym):
    n, k = shape
    w = _weight(n, k, seed=n * 7 + k)
    if group_size > k:
        with pytest.raises(FourbitError, match="-1"):
            quantize_groups(w, group_size, sym)
        return
    codes, scales, zeros = quantize_groups(w, group_size, sym)
    gs = k if group_size == -1 else group_size
    g = -(-k // gs)
    assert codes.dtype == torch.uint8 and codes.shape == (n, g * gs) and int(codes.max()) <= 15
    assert scales.dtype == torch.float32 and scales.shape == (n, g)
    assert (zeros is None) == sym and (sym or (zeros.dtype == torch.uint8 and zeros.shape == (n, g)))

    s = _expand(scales, k, group_size)
    err = (w - dequantize_groups(codes, scales, zeros, group_size, k=k)).abs()  # (N, k)
    assert (err <= s * (0.5 + 1e-5)).all(), float((err / s).max())
    # the grid is used: the worst error is a real fraction of s, not ~0 (catches s too large by 10x, say)
    assert float((err / s).max()) > 0.3

    # scales stored as fp16: codes made with fp32 scales stay valid, off by at most |q - z| * |s - s16|
    s16 = scales.half()
    err16 = (w - dequantize_groups(codes, s16, zeros, group_size, k=k)).abs()
    bound16 = 0.5 * s + 15 * (s - _expand(s16.float(), k, group_size)).abs()
    assert (err16 <= bound16 * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32(dtype):
    w = _weight(24, 256, seed=3, dtype=dtype)
    a, b = quantize_groups(w, 64, False), quantize_groups(w.float(), 64, False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    out = dequantize_groups(*a, 64, dtype=dtype)
    assert out.dtype == dtype and out.shape == (24, 256)


def test_padding_replicates_last_column():
    # K = 40 with groups of 32: the last group is cols 32..39 plus 24 columns copying col 39
    w = torch.full((2, 40), -2.0)
    w[:, 32:] = torch.linspace(0.5, 1.0, 8)
    codes, scales, zeros = quantize_groups(w, 32, False)
    assert codes.shape == (2, 64)
    assert torch.allclose(scales, torch.tensor([2.0 / 15, 1.0 / 15]).expand(2, 2))  # range [0, 1]: real values only
    assert (codes[:, 40:] == codes[:, 39:40]).all()


@pytest.mark.parametrize("sym", [False, True])
def test_constant_rows(sym):
    w = torch.zeros(4, 128)
    w[1], w[2], w[3] = 3.0, -0.25, 1e-30
    codes, scales, zeros = quantize_groups(w, 32, sym)
    assert torch.isfinite(scales).all() and (scales > 0).all()
    out = dequantize_groups(codes, scales, zeros, 32)
    assert torch.equal(out[0], torch.zeros(128))  # zero rows come back exactly zero
    assert torch.allclose(out[1:], w[1:], rtol=1e-6, atol=0)
    assert torch.equal(dequantize_groups(codes, scales.half(), zeros, 32)[0], torch.zeros(128))


def test_group_errors():
    with pytest.raises(FourbitError, match=r"group size 128 does not apply to in_features=64.*<= 64 or -1"):
        quantize_groups(torch.randn(8, 64), 128, False)
    with pytest.raises(FourbitError, match="not supported"):
        quantize_groups(torch.randn(8, 64), 16, True)
    with pytest.raises(FourbitError, match="NaN"):
        quantize_groups(torch.tensor([[1.0, float("nan")] * 16]), 32, False)
    with pytest.raises(FourbitError, match="2-D"):
        quantize_groups(torch.randn(64), -1, False)


def test_pad_to():
    x = torch.ones(3, 5, dtype=torch.uint8)
    y = pad_to(x, 1, 4)
    assert y.shape == (3, 8) and y.dtype == torch.uint8 and y[:, 5:].sum() == 0 and torch.equal(y[:, :5], x)
    assert pad_to(x, 0, 3) is x


# ---- AWQ ----------------------------------------------------------------------------------------

def test_awq_hand_built_word():
    codes = torch.arange(1, 9, dtype=torch.uint8)[:, None]  # (N=8, K=1): column c has code c + 1
    scales = torch.ones(8, 1)
    zeros = torch.tensor([[15], [0], [0], [0], [0], [0], [0], [9]], dtype=torch.uint8)
    qweight, qzeros, s = pack_awq(codes, scales, zeros)
    # nibbles 0..7 hold columns 0,2,4,6,1,3,5,7 -> codes 1,3,5,7,2,4,6,8 -> 0x86427531 (sign bit set)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 1)
    assert int(qweight[0, 0]) == 0x86427531 - 2**32
    assert int(qzeros[0, 0]) == 0x9000000F - 2**32  # column 7 -> nibble 7, column 0 -> nibble 0
    assert s.dtype == torch.float16 and s.shape == (1, 8)
    c2, s2, z2 = unpack_awq(qweight, qzeros, s)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales.half())


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("shape,group_size", [((64, 172), 128), ((256, 4096), 32), ((40, 300), -1)])
def test_awq_round_trip(shape, group_size, sym):
    w = _weight(*shape, seed=11)
    codes, scales, zeros = quantize_groups(w, group_size, sym)
    qweight, qzeros, s16 = pack_awq(codes, scales, zeros)
    n, kp = codes.shape
    assert qweight.shape == (kp, n // 8) and qzeros.shape == (scales.shape[1], n // 8) and s16.shape == scales.t().shape
    c2, s2, z2 = unpack_awq(qweight, qzeros, s16)
    assert torch.equal(c2, codes) and torch.equal(s2, scales.half())
    assert torch.equal(z2, torch.full_like(c2[:, : s2.shape[1]], 8) if sym else zeros)
    assert torch.equal(dequantize_groups(c2, s2, z2, group_size), dequantize_groups(codes, scales.half(), zeros, group_size))


def test_awq_errors():
    codes, scales, zeros = quantize_groups(torch.randn(13, 64), 32, False)
    with pytest.raises(FourbitError, match="multiple of 8"):
        pack_awq(codes, scales, zeros)
    qweight, qzeros, s16 = pack_awq(*quantize_groups(torch.randn(16, 64), 32, False))
    with pytest.raises(FourbitError, match="gemm"):
        unpack_awq(qweight, qzeros, s16[:, :8])


# ---- quick --------------------------------------------------------------------------------------

def _random_codes(n, k, seed):
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(13, 300), (172, 64), (64, 172), (256, 4096), (8, 128), (1, 1)])
def test_quick_round_trip(shape):
    n, k = shape
    codes = _random_codes(n, k, seed=n + k)
    qweight = pack_quick(codes)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (-(-n // N_TILE), -(-k // K_TILE) * 256) == qweight_shape(n, k)
    assert torch.equal(unpack_quick(qweight, n, k), codes)
    with pytest.raises(FourbitError, match="in_features"):
        unpack_quick(qweight, n, k + K_TILE)


def test_quick_matches_docstring_definition():
    # slow reference written straight from the module docstring, over 2 x 2 tiles with padding
    n, k = 29, 200
    codes = _random_codes(n, k, seed=5)
    padded = torch.zeros(32, 256, dtype=torch.int64)
    padded[:n, :k] = codes
    got = pack_quick(codes).to(torch.int64) & 0xFFFFFFFF
    for nb in range(2):
        for kc in range(2):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for r in range(8):
                    h, ch, rh = r // 4, r // 2 % 2, r % 2
                    word = 0
                    for p in range(8):
                        e, a = divmod(p, 4)
                        row, col = 16 * nb + 8 * rh + g, 128 * kc + 16 * (4 * h + a) + 8 * ch + 2 * t + e
                        word |= int(padded[row, col]) << (4 * p)
                    assert int(got[nb, kc * 256 + lane * 8 + r]) == word, (nb, kc, lane, r)


def test_quick_words_are_mma_a_fragments():
    # what the kernel relies on: in an m16n8k16 A fragment (PTX ISA, "mma.m16n8k16 fragment for A") lane l holds
    # rows l // 4 (+ 8 in registers 1 and 3) and columns 2 (l % 4) + {0, 1} (+ 8 in registers 2 and 3). Word
    # 4h + j of a lane, shifted by 4a and masked with 0x000F000F, must be register j of k16 slice i = 4h + a.
    codes = _random_codes(16, 128, seed=9)
    qweight = pack_quick(codes).to(torch.int64) & 0xFFFFFFFF  # (1, 256)
    for lane in range(32):
        for h in range(2):
            for j in range(4):
                w = int(qweight[0, 8 * lane + 4 * h + j])
                for a in range(4):
                    pair = (w >> (4 * a)) & 0x000F000F
                    row = lane // 4 + 8 * (j % 2)
                    col = 16 * (4 * h + a) + 2 * (lane % 4) + 8 * (j // 2)
                    assert pair & 0xF == codes[row, col] and pair >> 16 == codes[row, col + 1], (lane, h, j, a)
