"""Perplexity over a text: one BOS + the whole text as one string, non-overlapping windows, every next-token NLL.

The windows are independent (no state carried across), so a window's first token is predicted from nothing
and its first prediction is its second token: each window of L tokens scores L - 1 predictions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import FourbitError
from ..models.llama import LlamaModel


@torch.inference_mode()
def perplexity(model: LlamaModel, tokens: list[int], seq_len: int, batch_size: int = 8,
               max_tokens: int | None = None, progress: bool = True) -> dict:
    """tokens: the BOS-prefixed ids of the whole text. max_tokens evaluates only that prefix.

    Returns {"ppl", "nll" (mean nats per prediction), "tokens" (ids in the text, BOS included),
    "predictions", "windows", "seq_len"}.
    """
    if seq_len < 2:
        raise FourbitError(f"--seq-len must be at least 2, got {seq_len}")
    if seq_len > model.config.max_seq_len:
        raise FourbitError(f"--seq-len {seq_len} exceeds the model's context of {model.config.max_seq_len}")
    if batch_size < 1:
        raise FourbitError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise FourbitError(f"--max-tokens must be positive, got {max_tokens}")
    n_text = len(tokens)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    windows = len(tokens) // seq_len
    if windows == 0:
        raise FourbitError(f"the text has {len(tokens)} tokens, fewer than one window of --seq-len {seq_len}")
    ids = torch.tensor(tokens[:windows * seq_len], device=model.device).view(windows, seq_len)
    total = 0.0
    for i in tqdm(range(0, windows, batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = ids[i:i + batch_size]  # (b, L)
        logits = model(batch)[:, :-1]  # (b, L-1, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll)
    predictions = windows * (seq_len - 1)
    nll = total / predictions
    return {"ppl": math.exp(nll), "nll": nll, "tokens": n_text, "predictions": predictions, "windows": windows,
            "seq_len": seq_len}
