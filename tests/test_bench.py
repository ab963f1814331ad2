"""`fourbit bench gemm`'s own kernel: the pure-read ceiling must read every byte it claims to (interpreter on CPU)."""
import numpy as np
import pytest
import torch

from fourbit.bench import _pure_read, _read_words_per_program


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("words", [1000, 3 * 16384 + 77])
def test_pure_read_reads_every_word(words, overlap):
    # Each program stores the XOR of its share of the buffer; a word skipped (or read twice) changes the XOR.
    torch.manual_seed(words)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    buf = torch.randint(-2**31, 2**31 - 1, (words, ), dtype=torch.int32, device=dev)
    got = _pure_read(None, buf, overlap).cpu().numpy()
    per_prog = _read_words_per_program(words)
    padded = np.zeros(got.size * per_prog, np.int32)
    padded[:words] = buf.cpu().numpy()
    np.testing.assert_array_equal(got, np.bitwise_xor.reduce(padded.reshape(got.size, per_prog), axis=1))


def test_rounds_make_replays_long_enough():
    from fourbit.bench import MAX_CALLS, _rounds

    assert _rounds(3.0, 1, 2.0) == 1  # a replay already long enough
    assert _rounds(0.1, 6, 2.0) == 20  # 20 rounds of 6 calls: 2 ms
    assert _rounds(0.3, 4, 2.0) == 7  # rounded up
    assert _rounds(1e-4, 18, 2.0) == MAX_CALLS // 18  # capped
    assert _rounds(1e-4, 2 * MAX_CALLS, 2.0) == 1


def test_targets_by_shape_and_m():
    from fourbit.bench import target

    assert target("7b.qkv", 1) == target("7b.o", 16) == 4.0
    assert target("70b.down", 7) == 3.8
    assert target("7b.down", 128) == 2.0 and target("70b.qkv_gate_up", 128) == 1.6
    assert target("70b.down", 4096) == target("7b.o", 1024) == 0.95
    assert target("7b.qkv", 32) is None and target("70b.down", 512) is None  # no target at these M
    assert target("8b.qkv", 1) is None  # a shape of no targeted model


def test_results_table_counts_targets(tmp_path):
    from fourbit.bench import write_results

    def row(shape, m, fourbit, goal):
        ms = {"fourbit w4a16": 1 / fourbit, "cuBLAS bf16": 1.0}
        return {"shape": shape, "N": 16, "K": 32, "M": m, "ms": ms, "floor_ms": 0.1, "target": goal,
                "speedup_vs_bf16": {k: 1.0 / v for k, v in ms.items()}, "fraction_of_floor": 0.5}

    rows = [row("7b.o", 1, 4.5, 4.0), row("7b.o", 64, 2.5, 3.0), row("7b.o", 32, 2.0, None)]
    meta = {"gpu": "Test GPU", "date": "2026-11-23", "torch": "t", "triton": "t", "group_size": 128,
            "measured_copy_bandwidth_TBps": 3.0, "measured_bf16_TFLOPs": 700.0}
    write_results(tmp_path, meta, rows)
    md = (tmp_path / "test-gpu-w4a16.md").read_text()
    assert "Targets met: 1 of 2. Missed: 7b.o M = 64 2.50x (target 3.00x)." in md
    assert "| 7b.o (16×32) | 1 | 4.00x | 4.50x | 1.00x | 50% |" in md
    assert "| 7b.o (16×32) | 32 | – | 2.00x | 1.00x | 50% |" in md
