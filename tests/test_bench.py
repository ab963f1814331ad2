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
