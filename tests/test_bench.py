"""`fourbit bench gemm`'s own kernel: the pure-read ceiling must read every byte it claims to (interpreter on CPU)."""
import numpy as np
import pytest
import torch

from fourbit.bench import _pure_read, _read_words_per_program


@pytest.mark.parametrize("words", [1000, 3 * 16384 + 77])
def test_pure_read_reads_every_word(words):
    # Each program stores the XOR of its share of the buffer; a word skipped (or read twice) changes the XOR.
    torch.manual_seed(words)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    buf = torch.randint(-2**31, 2**31 - 1, (words, ), dtype=torch.int32, device=dev)
    got = _pure_read(None, buf).cpu().numpy()
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
