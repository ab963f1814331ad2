"""Calibration data for AWQ and GPTQ, and the block-by-block driver that runs it through a LlamaModel.

calib_tokens() makes the calibration batch: `nsamples` windows of `seqlen` token ids (nsamples, seqlen), cut at
seeded random offsets from a text file or a list of strings tokenized with the model's tokenizer, or uniformly
random token ids (for dummy models, which have no tokenizer and no text they were trained on). Windows are
drawn independently, so a text shorter than nsamples × seqlen tokens gives overlapping windows (as the GPTQ
reference code does); a text shorter than one window is an error.

quantize_blockwise() feeds that batch through the decoder one block at a time, so memory holds one block's
activations (the block inputs and outputs, (nsamples, seqlen, dim) each, in the model's dtype, on its device):

    h0 = the inputs of block 0, captured by stopping LlamaModel.forward there (with the RoPE cos/sin and mask
         it computed, so nothing about positions is re-derived here)
    for each block i:  step(block i, h_i)      the algorithm quantizes the block's Linears in place
                       h_{i+1} = block_i(h_i)  the *quantized* block, so later blocks see the errors of
                                               earlier ones and can compensate for them (as GPTQ does)

Blocks run on mini-batches of about TOKENS_PER_BATCH tokens: the MLP's (tokens, hidden_dim) intermediates of a
whole 128 × 512 batch of Llama-2-7B would take ~1.4 GB each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..errors import FourbitError

TOKENS_PER_BATCH = 8192  # tokens per block forward: large enough to keep a GPU busy, small enough for memory


def calib_tokens(source=None, tokenizer=None, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                 vocab_size: int | None = None) -> torch.Tensor:
    """Calibration token ids, int64 (nsamples, seqlen), on the CPU.

    source: a UTF-8 text file (str or Path), a list of strings (tokenized one by one, then concatenated), or
    None for uniformly random ids in [0, vocab_size). tokenizer: a fourbit Tokenizer (any object with
    encode(text) -> list[int]); needed for text. No BOS is added: windows start mid-text, as perplexity
    windows do. seed fixes the window offsets (or the random ids).
    """
    if nsamples < 1:
        raise FourbitError(f"nsamples (--nsamples) must be at least 1, got {nsamples}")
    if seqlen < 1:
        raise FourbitError(f"seqlen (--seqlen) must be at least 1, got {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    if source is None:
        if not vocab_size:
            raise FourbitError("random calibration tokens need the model's vocab_size; or pass calibration text")
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=gen)
    if tokenizer is None:
        raise FourbitError("calibration text needs the model's tokenizer: pass --tokenizer FILE (or tokenizer=)")
    if isinstance(source, (str, Path)):
        try:
            texts = [Path(source).read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError) as e:
            raise FourbitError(f"cannot read the calibration text --calib {source}: {e}") from None
        where = f"--calib {source}"
    else:
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise FourbitError("calibration source must be a text file path, a list of strings, or None")
        where = f"the {len(texts)} calibration strings"
    ids = torch.tensor([i for t in texts for i in tokenizer.encode(t)], dtype=torch.long)  # (T,)
    if ids.numel() < seqlen:
        raise FourbitError(f"{where} has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}: "
                           f"pass a longer calibration text or a smaller --seqlen")
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)  # (nsamples,)
    return ids[starts[:, None] + torch.arange(seqlen)]  # (nsamples, seqlen)


def check_tokens(tokens, model) -> torch.Tensor:
    """Calibration ids for a LlamaModel: an integer tensor (N, L) with L within the model's context."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise FourbitError("calibration for a fourbit LlamaModel is an integer tensor of token ids (nsamples, "
                           "seqlen), e.g. fourbit.calib_tokens(text_file, tokenizer)")
    if tokens.numel() == 0:
        raise FourbitError("the calibration batch is empty: pass at least one sample of at least one token")
    if tokens.shape[1] > model.config.max_seq_len:
        raise FourbitError(f"calibration seqlen {tokens.shape[1]} exceeds the model's context of "
                           f"{model.config.max_seq_len}: use a smaller --seqlen")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.config.vocab_size:
        raise FourbitError(f"calibration token ids must be in [0, {model.config.vocab_size}): was the text "
                           f"tokenized with the model's own tokenizer?")
    return tokens.long()


def replace_module(root: nn.Module, name: str, new: nn.Module):
    """Put `new` where root.<name> is (name dotted, as named_modules gives it)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (the rest would be wasted work)."""


class BlockInputs:
    """The calibration activations entering one decoder block, in mini-batches, with the rest of each call's
    arguments (RoPE cos/sin (b, L, D/2), mask, ...) as LlamaModel.forward passed them to block 0."""

    def __init__(self, xs: list[torch.Tensor], rest: list[tuple[tuple, dict]]):
        self.xs = xs  # [(b, L, dim)] in the model's dtype, on its device
        self.rest = rest  # [(args after x, kwargs)], one per mini-batch

    @property
    def tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.xs)

    def run(self, module: nn.Module, xs: list[torch.Tensor] | None = None, keep: bool = False):
        """module(x, *args, **kwargs) for each mini-batch (x from xs, default the block inputs).

        Returns the outputs when keep, else None; a hook that raises StopForward ends that mini-batch early.
        """
        outs = []
        for x, (args, kwargs) in zip(self.xs if xs is None else xs, self.rest):
            try:
                y = module(x, *args, **kwargs)
            except StopForward:
                continue
            if keep:
                outs.append(y)
        return outs if keep else None


def block_outputs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Whole block outputs from what models/llama.Block returns, (stream, MLP output) pairs: their sums."""
    return [x + delta for x, delta in pairs]


def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int | None = None) -> BlockInputs:
    """Run the model's embedding (and whatever else precedes block 0) on tokens (N, L) in mini-batches."""
    n, length = tokens.shape
    batch_size = batch_size or max(1, TOKENS_PER_BATCH // length)
    xs, rest = [], []

    def grab(_module, args, kwargs):
        xs.append(args[0])
        rest.append((args[1:], kwargs))
        raise StopForward

    handle = model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, n, batch_size):
            try:
                model(tokens[i:i + batch_size].to(model.device))
            except StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(xs, rest)


@torch.no_grad()
def quantize_blockwise(model, tokens: torch.Tensor, step: Callable, desc: str, batch_size: int | None = None,
                       progress: bool = True) -> None:
    """For each decoder block: step(prefix, block, inputs, note) quantizes it in place, then the quantized block
    makes the next block's inputs. prefix is the block's module name ("layers.3"); note(text) shows what the
    step is doing on the progress bar (one bar, one tick per block, on stderr)."""
    tokens = check_tokens(tokens, model)
    inputs = capture_block_inputs(model, tokens, batch_size)
    with tqdm(total=len(model.layers), desc=desc, unit="block", disable=not progress) as bar:
        for i, block in enumerate(model.layers):
            step(f"layers.{i}", block, inputs, lambda text: bar.set_postfix_str(text, refresh=True))
            if i + 1 < len(model.layers):  # the last block's outputs are not needed
                inputs = BlockInputs(block_outputs(inputs.run(block, keep=True)), inputs.rest)
            bar.update()
