"""fourbit: 4-bit LLM quantization and fast inference (QUICK W4A16, QServe W4A8KV4, QUIK W4A4)."""
__version__ = "0.1.0"

from .api import export, load, quantize, quantize_, save  # noqa: E402
from .config import EngineConfig, ModelConfig, SamplingParams, W4A16Config  # noqa: E402
from .engine.llm import LLM  # noqa: E402
from .errors import FourbitError  # noqa: E402
from .eval.perplexity import perplexity  # noqa: E402
from .models.generate import generate  # noqa: E402
from .models.tokenizer import Tokenizer  # noqa: E402
from .nn.linear import W4A16Linear  # noqa: E402
from .quantize.calib import calib_tokens  # noqa: E402

__all__ = ["load", "quantize", "quantize_", "calib_tokens", "save", "export", "LLM", "EngineConfig", "ModelConfig",
           "SamplingParams",
           "W4A16Config", "FourbitError", "perplexity", "generate", "Tokenizer", "W4A16Linear"]
