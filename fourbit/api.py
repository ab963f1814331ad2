"""quantize_() (and quantize()), save(), load(): the library's front door."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from . import __version__
from .config import ModelConfig, W4A16Config
from .errors import FourbitError
from .formats.uint4 import group_length
from .models.llama import LlamaModel
from .models.loader import build, load_model, read_safetensors
from .models.tokenizer import Tokenizer
from .nn.fuse import check_unfused
from .nn.linear import linear_factory
from .quantize.awq import awq_block
from .quantize.calib import TOKENS_PER_BATCH, quantize_blockwise, replace_module
from .quantize.gptq import gptq_block, gptq_module
from .quantize.rtn import rtn_linear

FORMAT_VERSION = 1  # of the fourbit checkpoint directory (config.json + model.safetensors)


def quantize_(module: nn.Module, config: W4A16Config, calib=None, filter=None, progress: bool = True,
              report: dict | None = None) -> nn.Module:
    """Swap the module's nn.Linear layers for W4A16Linear in place, choosing the codes with config.algo;
    returns the module.

    module: any torch.nn.Module. fourbit's LlamaModel is calibrated block by block (quantize/calib.py: memory
    holds one block's activations); any other module (a Hugging Face transformers model, a plain MLP) is run
    whole on the calibration calls with hooks on its Linears (GPTQ only, quantize/gptq.gptq_module).
    config.algo: "rtn" needs no calibration; "gptq" works on any module; "awq" needs the norm -> linear map of
    the model, which fourbit knows for its LlamaModel (the Llama family as fourbit.load builds it).
    calib (awq and gptq):
        - token ids, an integer tensor (nsamples, seqlen), e.g. fourbit.calib_tokens(text_file, tokenizer):
          the only form a LlamaModel takes; other modules are called as module(ids) on mini-batches of rows
          of about 8192 tokens (so a Hugging Face causal LM takes it as its input_ids);
        - other modules only: a list of calls, each item a tensor (module(t)), a tuple (module(*t)) or a dict
          (module(**d)), already on the module's device.
      The module runs in its current mode: call .eval() first if it has dropout.
    filter(name, module) -> bool picks the layers (default: all but the classifier `lm_head`).
    report, if given, receives {layer name: ‖W − Ŵ‖/‖W‖} for the float weight each layer was quantized from
    (AWQ: the scaled weight, before clipping).
    """
    if not isinstance(config, W4A16Config):
        raise FourbitError(f"expected a W4A16Config, got {type(config).__name__}")
    if config.permuted:
        raise FourbitError("permuted=True describes imported GPTQ act-order checkpoints, whose groups are scattered "
                           "over the input channels; to quantize with act-order use W4A16Config(algo='gptq', "
                           "act_order=True), which keeps the groups contiguous")
    if filter is None:
        filter = lambda name, module: not name.endswith("lm_head")  # noqa: E731
    check_unfused(module, "quantizing")
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and filter(n, m)]
    if not targets:
        raise FourbitError("no nn.Linear layers to quantize (already quantized, or the filter excludes all)")
    for _, linear in targets:  # fail before any work when the group size cannot apply to some layer
        group_length(linear.in_features, config.group_size)
    if config.algo == "awq" and not isinstance(module, LlamaModel):
        raise FourbitError(f"AWQ folds its scales into the op before each Linear, which fourbit knows only "
                           f"for its own LlamaModel, not for {type(module).__name__}: load the model with "
                           f"fourbit.load, or use algo 'gptq' (any module) or 'rtn'")
    if config.algo != "rtn" and calib is None:
        raise FourbitError(f"algo {config.algo!r} needs calibration data: pass calib= token ids "
                           f"(nsamples, seqlen), e.g. fourbit.calib_tokens(text_file, tokenizer) "
                           f"(CLI: --calib FILE), or use algo 'rtn'")
    if config.algo == "rtn":
        _rtn(module, targets, config, progress, report)
    elif isinstance(module, LlamaModel):
        _blockwise(module, targets, config, calib, progress, report)
    else:
        gptq_module(module, [n for n, _ in targets], config, _calib_calls(calib, module), report, progress)
    module.quant_config = config
    return module


def quantize(model: nn.Module, config: W4A16Config, filter=None, report: dict | None = None,
             progress: bool = True, calib=None) -> nn.Module:
    """quantize_ with the arguments in this older order (RTN needs no calib; AWQ and GPTQ do)."""
    return quantize_(model, config, calib, filter, progress, report)


def _rtn(module, targets, config, progress, report):
    for name, linear in tqdm(targets, desc=f"quantize w4a16 {config.algo} g{config.group_size}", unit="layer",
                             disable=not progress):
        quantized = rtn_linear(linear, config)
        if report is not None:
            w = linear.weight.detach().float()
            report[name] = float((quantized.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
        replace_module(module, name, quantized)


def _blockwise(model: LlamaModel, targets, config, calib, progress, report):
    names = {n for n, _ in targets}
    outside = sorted(n for n in names if not n.startswith("layers."))
    if outside:
        raise FourbitError(f"algo {config.algo!r} quantizes the decoder blocks' Linears; the filter also selects "
                           f"{outside}: exclude them (the default filter leaves out lm_head) or use algo 'rtn'")
    step = gptq_block if config.algo == "gptq" else awq_block
    order = " act-order" if config.act_order else ""
    quantize_blockwise(
        model, calib, lambda prefix, block, inputs, note: step(prefix, block, inputs, note, config,
                                                               names.__contains__, report),
        desc=f"quantize w4a16 {config.algo}{order} g{config.group_size}", progress=progress)


def _calib_calls(calib, module: nn.Module) -> list[tuple[tuple, dict]]:
    """The calibration calls module(*args, **kwargs) for a module other than LlamaModel (see quantize_)."""
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype.is_floating_point or calib.numel() == 0:
            raise FourbitError("calib as a tensor is token ids, an integer (nsamples, seqlen) tensor; pass other "
                               "inputs as a list of calls (tensors, tuples of arguments or dicts of keywords)")
        device = next(module.parameters()).device
        rows = max(1, TOKENS_PER_BATCH // calib.shape[1])
        return [((calib[i:i + rows].to(device),), {}) for i in range(0, calib.shape[0], rows)]
    if not isinstance(calib, (list, tuple)) or not calib:
        raise FourbitError("calib must be token ids (an integer tensor) or a non-empty list of calls")
    calls = []
    for item in calib:
        if isinstance(item, torch.Tensor):
            calls.append(((item,), {}))
        elif isinstance(item, tuple):
            calls.append((item, {}))
        elif isinstance(item, dict):
            calls.append(((), item))
        else:
            raise FourbitError(f"a calibration call must be a tensor, a tuple or a dict, got {type(item).__name__}")
    return calls


def save(model: LlamaModel, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a fourbit checkpoint directory: config.json, model.safetensors and the tokenizer file if given."""
    check_unfused(model, "saving")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FourbitError(f"{path} exists and is not a directory: choose another output directory")
    path.mkdir(parents=True, exist_ok=True)
    quant = getattr(model, "quant_config", None)
    meta = {"fourbit": {"format_version": FORMAT_VERSION, "version": __version__},
            "model": model.config.to_dict(), "torch_dtype": str(model.dtype).removeprefix("torch.")}
    if quant is not None:
        meta["quantization_config"] = quant.to_dict()
    tensors = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.copy_to(path)
    return path


def load_fourbit(path: Path, dtype: torch.dtype | None = None, device="cpu") -> LlamaModel:
    meta = json.loads((path / "config.json").read_text())
    version = meta["fourbit"].get("format_version")
    if version != FORMAT_VERSION:
        raise FourbitError(f"{path} is a fourbit checkpoint of format version {version}; this fourbit reads "
                           f"version {FORMAT_VERSION}: use a matching fourbit release")
    config = ModelConfig.from_dict(meta["model"])
    quant = W4A16Config.from_dict(meta["quantization_config"]) if "quantization_config" in meta else None
    dtype = dtype or getattr(torch, meta.get("torch_dtype", "float32"))
    kwargs = {} if quant is None else {"make_linear": linear_factory(quant)}
    tensors = read_safetensors(path)
    # projections stored as .weight stay float (an imported checkpoint's modules_to_not_convert)
    float_linears = {n.removesuffix(".weight") for n in tensors if n.endswith("_proj.weight")}
    model = build(config, tensors, dtype, device, float_linears=float_linears, **kwargs)
    if quant is not None:
        model.quant_config = quant
    return model


def load(path: str | Path, dtype: torch.dtype | None = None, device="cpu", seed: int = 0) -> LlamaModel:
    """Load a fourbit checkpoint, a Hugging Face directory (float, AutoAWQ GEMM or GPTQ v1), a llama2.c .bin, or
    dummy:<preset> (seeded)."""
    return load_model(str(path), dtype, device, seed)


def export(model: LlamaModel, path: str | Path, format: str = "awq", tokenizer: Tokenizer | None = None) -> Path:
    """Write a W4A16 model as a Hugging Face checkpoint other tools read: format "awq" (AutoAWQ GEMM) or "gptq" (v1).

    path must be new or an empty directory. See interop/exporter.py for what each format can hold.
    """
    from .interop.exporter import export_hf

    return export_hf(model, Path(path), format, tokenizer)
