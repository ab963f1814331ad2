"""Paged attention: the torch reference against dense SDPA, and the Triton kernel against the reference (on the GPU
when there is one, else in Triton's interpreter, where only fp16 dots are trustworthy: DESIGN §5).

Every batch scatters each sequence's K/V into randomly shuffled blocks of a cache whose other slots hold NaN, so a
kernel that reads a key past seq_len, a wrong block or a padding row's blocks returns NaN, and every output is
poisoned with NaN before the call."""
import math

import pytest
import torch
import torch.nn.functional as F

from fourbit.errors import FourbitError
from fourbit.kernels.paged_attention import AttnConfig, paged_attention
from fourbit.kernels.ref import paged_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(specs, hq, hkv, d, bs, dtype, seed, pad_blocks=2):
    """specs: (seq_len, q_len) per sequence. Returns the kernel's arguments and, per sequence, its dense
    (Hkv, seq_len, D) K, V in float32 and its (q_len, Hq, D) queries."""
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / bs) for n, _ in specs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # blocks of a sequence land anywhere, out of order
    width = max(need + [1]) + pad_blocks
    k_cache = torch.full((num_blocks, hkv, bs, d), float("nan"))
    v_cache = torch.full((num_blocks, hkv, bs, d), float("nan"))
    tables = torch.full((len(specs), width), perm[-1], dtype=torch.int32)  # padding: a valid id (all NaN)
    dense, qs, starts = [], [], [0]
    for s, (n, q_len) in enumerate(specs):
        ids = [perm.pop(0) for _ in range(need[s])]
        tables[s, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(hkv, n, d, generator=gen).to(dtype).float()
        v = torch.randn(hkv, n, d, generator=gen).to(dtype).float()
        for t in range(n):
            k_cache[ids[t // bs], :, t % bs] = k[:, t]
            v_cache[ids[t // bs], :, t % bs] = v[:, t]
        dense.append((k, v))
        qs.append(torch.randn(q_len, hq, d, generator=gen).to(dtype).float())
        starts.append(starts[-1] + q_len)
    q = torch.cat(qs) if qs else torch.zeros(0, hq, d)
    args = dict(q=q.to(DEVICE, dtype), k_cache=k_cache.to(DEVICE, dtype), v_cache=v_cache.to(DEVICE, dtype),
                block_tables=tables.to(DEVICE), seq_lens=torch.tensor([n for n, _ in specs], dtype=torch.int32,
                                                                      device=DEVICE),
                query_start=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                max_query_len=max([ql for _, ql in specs] + [1]), scale=1 / math.sqrt(d))
    return args, dense, qs


def _rel(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _check_kernel(specs, hq=8, hkv=2, d=64, bs=16, window=None, config=None, seed=0, tol=1e-2):
    args, _, _ = _batch(specs, hq, hkv, d, bs, torch.float16, seed)
    ref = paged_attention_ref(**args, sliding_window=window)
    out = torch.full_like(args["q"], float("nan"))
    got = paged_attention(**args, sliding_window=window, out=out, config=config)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float16
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < tol, _rel(out, ref)
    return out, ref


# ---- the reference against dense attention ---------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_reference_matches_dense_sdpa(window, hq, hkv):
    specs = [(1, 1), (17, 17), (40, 9), (33, 1), (0, 1), (100, 100)]
    args, dense, qs = _batch(specs, hq, hkv, 32, 16, torch.float32, seed=hq + (window or 0))
    out = paged_attention_ref(**args, sliding_window=window)
    assert out.dtype == torch.float32 and out.shape == args["q"].shape
    start = 0
    for (n, q_len), (k, v), q in zip(specs, dense, qs):
        got = out[start:start + q_len].cpu()
        start += q_len
        if n == 0:
            assert (got == 0).all()
            continue
        pos = torch.arange(n - q_len, n)[:, None]
        kpos = torch.arange(n)[None, :]
        mask = (kpos <= pos) & ((kpos > pos - window) if window else True)  # (q_len, n)
        k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)  # (Hq, n, D)
        want = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=args["scale"])
        assert _rel(got, want.transpose(0, 1)) < 1e-5


# ---- the kernel against the reference ---------------------------------------------------------------------------

ODD = [1, 15, 17, 33, 100]


@pytest.mark.parametrize("bs", [16, 32])
def test_decode_batch(bs):
    _check_kernel([(n, 1) for n in ODD] + [(0, 1)], bs=bs, seed=bs)  # + a CUDA-graph padding row


@pytest.mark.parametrize("bs", [16, 32])
def test_prefill(bs):
    _check_kernel([(n, n) for n in ODD], bs=bs, seed=bs + 1)


def test_chunked_prefill():
    """Part of each context is already cached; the chunk attends it and itself causally."""
    _check_kernel([(100, 37), (33, 16), (17, 2), (64, 15), (5, 4)], seed=3)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1), (12, 4)])
def test_mixed_batch_gqa(hq, hkv):
    """Decodes, prefill chunks, a whole prompt and a padding row in one step; G = 1, 4, 8 and 3 (not a power of
    two: padded rows)."""
    specs = [(33, 1), (100, 20), (0, 1), (15, 15), (1, 1), (70, 1)]
    out, _ = _check_kernel(specs, hq=hq, hkv=hkv, seed=hq * hkv)
    assert (out[21:22] == 0).all()  # the padding row (seq_len 0)


@pytest.mark.parametrize("window", [1, 8, 40])
def test_sliding_window(window):
    _check_kernel([(100, 37), (33, 1), (100, 1), (17, 17), (0, 1)], window=window, seed=window)


def test_head_dims_and_small_tiles():
    """D = 32 and 128, and tiles far smaller than the sequences (BLOCK_Q 2 × G 8 = 16 rows, BLOCK_N 16): many
    query tiles per sequence (the slot search), all three key loops (window edge, mask-free, diagonal)."""
    specs = [(100, 37), (33, 1), (17, 17), (0, 1)]
    _check_kernel(specs, hq=8, hkv=1, d=32, seed=11, window=30, config=AttnConfig(2, 16, 4, 2, 1))
    _check_kernel(specs, hq=4, hkv=2, d=128, seed=12)


@pytest.mark.parametrize("window", [None, 20])
def test_split_kv_decode(window):
    """Flash decoding: each sequence's keys in 4 shares of whole 16-key tiles (the short sequences leave some
    splits empty); a sequence with no new token this step (q_len 0) writes nothing."""
    specs = [(100, 1), (1, 1), (0, 1), (47, 1), (30, 0), (65, 1)]
    _check_kernel(specs, hq=8, hkv=2, window=window, config=AttnConfig(4, 16, 4, 2, 4), seed=21)


def test_split_kv_decode_empty_splits_write_no_acc(monkeypatch):
    """Split-KV decode with 8 splits of 128-key tiles (1 stage): contexts of 1-3 tiles leave most splits empty,
    which write no acc; the combine must not read it (the workspace is poisoned with NaN), also for a padding
    sequence (seq_len 0) whose splits are all empty."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    specs = [(300, 1), (1, 1), (0, 1), (129, 1), (128, 1)]
    for window in (None, 150):
        _check_kernel(specs, hq=8, hkv=2, window=window, config=AttnConfig(4, 128, 4, 1, 8), seed=23)


def test_strided_q_and_padded_queries():
    """q as a view of a fused qkv output (row stride > Hq·D); query_start padded past the last sequence
    (CUDA-graph token padding: rows nobody owns are left as they were)."""
    args, _, _ = _batch([(40, 9), (33, 1)], 8, 2, 64, 16, torch.float16, seed=5)
    t = args["q"].shape[0]
    qkv = torch.randn(t + 3, 8 + 2 * 2, 64, device=DEVICE, dtype=torch.float16)
    qkv[:t, :8] = args["q"]
    args["q"] = qkv[:, :8]  # (T + 3, 8, 64), stride(0) = 12 · 64
    ref = paged_attention_ref(**args)
    out = torch.full((t + 3, 8, 64), float("nan"), device=DEVICE, dtype=torch.float16)
    paged_attention(**args, out=out)
    assert _rel(out[:t], ref[:t]) < 1e-2 and out[t:].isnan().all()


def test_errors_name_the_fix():
    args, _, _ = _batch([(5, 5)], 4, 2, 64, 16, torch.float16, seed=0)
    bad = dict(args, q=torch.zeros(5, 4, 80, device=DEVICE, dtype=torch.float16))
    with pytest.raises(FourbitError, match="head_dim in"):
        paged_attention(**bad)
    with pytest.raises(FourbitError, match="int32"):
        paged_attention(**dict(args, seq_lens=args["seq_lens"].long()))
    with pytest.raises(FourbitError, match="dtype"):
        paged_attention(**dict(args, q=args["q"].float()))
    with pytest.raises(FourbitError, match="multiple of kv heads"):
        paged_attention(**dict(args, q=torch.zeros(5, 3, 64, device=DEVICE, dtype=torch.float16)))
