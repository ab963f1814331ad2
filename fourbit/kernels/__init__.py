"""GPU kernels (Triton/Gluon), one op per file, and their torch twins in ref.py."""

import functools

HEAD_DIMS = (32, 64, 128, 256)  # the head dims the paged-attention kernel takes (the KV cache pads up to one)


@functools.cache  # on the launch path of every kernel that sizes its grid by the SM count
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device `device_index`."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    """Compute capability (major, minor) of CUDA device `device_index`."""
    import torch

    return torch.cuda.get_device_capability(device_index)
