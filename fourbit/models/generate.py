"""Batched generation over the static KV cache: one prefill of the left-padded prompts, then decode steps."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import SamplingParams
from ..errors import FourbitError
from .llama import LlamaModel


def sample(logits, params: SamplingParams, generator: torch.Generator | None = None):
    """logits (B, V) -> token ids (B,). Greedy at temperature 0; else temperature + top-p (nucleus) sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = nucleus(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def nucleus(probs, top_p):
    """probs (B, V) with each row cut to its top-p nucleus: the smallest prefix of the sorted probabilities whose
    mass reaches top_p (a float, or a (B, 1) tensor of per-row values); the most likely token always stays."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


@torch.inference_mode()
def generate(model: LlamaModel, prompts: list[list[int]], params: SamplingParams, seed: int | None = None,
             on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens of each, without the prompt.

    on_token(row, token) is called for every kept token as it is produced (for streaming).
    A row stops at one of the model's EOS ids (not returned) when params.stop_at_eos, or after max_new_tokens.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FourbitError("every prompt needs at least one token (e.g. BOS)")
    B, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > model.config.max_seq_len:
        raise FourbitError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                           f"model's context of {model.config.max_seq_len} tokens: ask for fewer tokens")
    dev = model.device
    pad = torch.tensor([longest - len(p) for p in prompts], device=dev)
    tokens = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=dev)  # (B, T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    cache = model.new_cache(B, max(total - 1, longest))
    out: list[list[int]] = [[] for _ in range(B)]
    done = [params.max_new_tokens == 0] * B
    eos = set(model.config.eos_ids) if params.stop_at_eos else set()
    logits = model(tokens, cache, 0, pad)[:, -1]
    pos = longest
    while not all(done):
        nxt = sample(logits, params, generator)  # (B,)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t in eos:
                done[b] = True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, t)
            done[b] = len(out[b]) >= params.max_new_tokens
        if all(done):
            break
        logits = model(nxt[:, None], cache, pos, pad)[:, -1]
        pos += 1
    return out
