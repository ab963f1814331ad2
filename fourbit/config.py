"""Frozen, versioned configuration dataclasses.

ModelConfig describes a Llama-family architecture; W4A16Config a weight-quantization scheme; SamplingParams
how to pick the next token. Each round-trips through a plain dict (JSON) so checkpoints carry them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import FourbitError

SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per output channel (per-channel)
ALGOS = ("rtn", "awq", "gptq")  # how W4A16 codes are chosen; awq and gptq need calibration data


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int  # SwiGLU intermediate size
    head_dim: int = 0  # 0 = dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_interleaved: bool = False  # True: pairs (x[2i], x[2i+1]) (Meta/llama2.c); False: HF rotate_half
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...} as in HF config.json
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    sliding_window: int | None = None  # Mistral v0.1: keys further back than this are not attended
    bos_id: int | None = 1
    eos_ids: tuple[int, ...] = (2,)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        if self.n_heads % self.n_kv_heads:
            raise FourbitError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise FourbitError(f"head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class W4A16Config:
    """4-bit weights (uint4 codes in groups along the input dim), 16-bit activations.

    group_size: 32, 64, 128, or -1 for one group per output channel. sym: zero point fixed at 8 instead of
    a per-group uint4 zero. algo: how the codes are chosen: "rtn" (round to nearest, no data), "awq" or "gptq"
    (both need calibration data, see fourbit.quantize_; they also name the origin of imported AutoAWQ / GPTQ
    checkpoints). act_order (GPTQ only): quantize columns in order of decreasing Hessian diagonal, with group
    parameters fixed up front ("static groups") so the stored groups stay contiguous in the original column order
    and the checkpoint layout is the same as without it. permuted: the layers carry an input-channel permutation
    `perm` (imported GPTQ act-order checkpoints, whose groups are scattered over the input channels; see
    nn/linear.py).
    """
    group_size: int = 128
    sym: bool = False
    algo: str = "rtn"
    act_order: bool = False
    permuted: bool = False
    format: str = field(default="quick", init=False)
    version: int = field(default=2, init=False)  # of the quick layout (formats/quick.py)

    def __post_init__(self):
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise FourbitError(f"group size {self.group_size} is not supported: use one of 32, 64, 128 or -1 (per-channel)")
        if self.algo not in ALGOS:
            raise FourbitError(f"quantization algorithm {self.algo!r} is not available: use one of "
                               f"{', '.join(map(repr, ALGOS))}")
        if self.act_order and self.algo != "gptq":
            raise FourbitError(f"act_order (--act-order) is a GPTQ option, not available with algo {self.algo!r}: "
                               f"use algo 'gptq' (--algo gptq) or drop act_order")

    def to_dict(self) -> dict:
        return {"quant_method": "fourbit", "scheme": "w4a16", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "W4A16Config":
        if d.get("scheme") != "w4a16" or d.get("format") != "quick":
            raise FourbitError(f"not a fourbit W4A16 quantization_config: {d}")
        if d.get("version") == 1:
            raise FourbitError("this checkpoint uses the quick layout v1 of fourbit 0.1 pre-releases, which this "
                               "fourbit no longer reads: quantize the model again with `fourbit quantize`")
        if d.get("version") != 2:
            raise FourbitError(f"fourbit W4A16 format version {d.get('version')} is newer than this fourbit "
                               f"understands (2): upgrade fourbit")
        # act_order and permuted came later: dicts written before them were neither
        return cls(group_size=d["group_size"], sym=d["sym"], algo=d["algo"], act_order=d.get("act_order", False),
                   permuted=d.get("permuted", False))


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the top-p nucleus."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_at_eos: bool = True
    seed: int | None = None  # engine: this request samples from its own generator, seeded so (reproducible)

    def __post_init__(self):
        if self.temperature < 0:
            raise FourbitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FourbitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise FourbitError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """How the serving engine (fourbit.engine) lays out its KV cache and batches its steps."""
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV blocks; None: sized from kv_cache_fraction of the free device memory
    kv_cache_fraction: float = 0.9  # of the memory left after the weights (CUDA), when num_blocks is None
    max_num_seqs: int = 256  # sequences in one step (the largest decode batch)
    max_num_batched_tokens: int = 2048  # token budget of one step: prefill chunks + decodes
    max_model_len: int | None = None  # tokens per sequence; None: the model's max_seq_len
    prefix_sharing: bool = True  # identical full prompt blocks are computed once and shared
    cuda_graphs: bool = True  # decode steps replay CUDA graphs captured per batch-size bucket
    async_scheduling: bool = True  # schedule and launch step N+1 before reading step N's tokens back
    max_queued: int = 1024  # server: requests in flight (waiting + running) before new ones get 503

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queued"):
            if getattr(self, name) < 1:
                raise FourbitError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size & (self.block_size - 1):
            raise FourbitError(f"block_size must be a power of two (16 is usual), got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise FourbitError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise FourbitError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
