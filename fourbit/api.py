"""quantize(), save(), load(): the library's front door."""
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
from .nn.linear import linear_factory
from .quantize.rtn import rtn_linear

FORMAT_VERSION = 1  # of the fourbit checkpoint directory (config.json + model.safetensors)


def quantize(model: nn.Module, config: W4A16Config, filter=None, report: dict | None = None,
             progress: bool = True) -> nn.Module:
    """Swap the model's nn.Linear layers for W4A16Linear, in place; returns the model.

    filter(name, module) -> bool picks layers (default: all but the classifier `lm_head`). report, if given,
    receives {layer name: relative error ‖W - Ŵ‖/‖W‖}.
    """
    if not isinstance(config, W4A16Config):
        raise FourbitError(f"expected a W4A16Config, got {type(config).__name__}")
    if config.algo != "rtn" or config.permuted:
        raise FourbitError(f"quantize() runs algo='rtn' without permutations (got algo={config.algo!r}, permuted="
                           f"{config.permuted}): 'awq'/'gptq' and permuted describe imported checkpoints")
    if filter is None:
        filter = lambda name, module: not name.endswith("lm_head")  # noqa: E731
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter(n, m)]
    if not targets:
        raise FourbitError("no nn.Linear layers to quantize (already quantized, or the filter excludes all)")
    for _, linear in targets:  # fail before any work when the group size cannot apply to some layer
        group_length(linear.in_features, config.group_size)
    for name, linear in tqdm(targets, desc=f"quantize w4a16 {config.algo} g{config.group_size}", unit="layer",
                             disable=not progress):
        quantized = rtn_linear(linear, config)
        if report is not None:
            w = linear.weight.detach().float()
            report[name] = float((quantized.dequantize() - w).norm() / w.norm().clamp_min(1e-30))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    model.quant_config = config
    return model


def save(model: LlamaModel, path: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write a fourbit checkpoint directory: config.json, model.safetensors and the tokenizer file if given."""
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
