"""CUDA-graph capture, the one way the project records GPU work for replay."""
from __future__ import annotations

import functools

import torch


def capture(fn, device=None, pool=None) -> torch.cuda.CUDAGraph:
    """Run fn once on a side stream (lazy initialization, kernel compilation and allocator growth stay out of
    the graph, as capture requires), then record one call of fn; graph.replay() repeats it. Graphs given the same
    pool (torch.cuda.graph_pool_handle()) share their memory: capture the largest first."""
    with torch.cuda.device(device):
        side = _side_stream(torch.cuda.current_device())
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
    return graph


@functools.cache
def _side_stream(device: int) -> torch.cuda.Stream:
    """One warm-up stream per device for every capture: cuBLAS keeps a workspace for each stream it has run on
    for the life of the process (~32 MB on Hopper), so a new stream per graph held ~1 GB after an engine's
    graphs were gone."""
    return torch.cuda.Stream(device)
