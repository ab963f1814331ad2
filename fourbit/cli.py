"""`fourbit generate | serve | ppl | quantize | export | demo | bench`: the command line, one command per API entry point.

Errors a user can cause print one line (`fourbit: error: ...`) and exit 1; progress bars go to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SCHEMES = ("fp32", "bf16", "fp16", "w4a16")
FLOAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _model_args(p: argparse.ArgumentParser):
    p.add_argument("model", metavar="MODEL",
                   help="Hugging Face directory (float, AutoAWQ GEMM or GPTQ v1), llama2.c .bin, fourbit checkpoint "
                        "directory, or dummy:<preset>")
    p.add_argument("--tokenizer", help="tokenizer.model (SentencePiece) or tokenizer.json; default: found beside MODEL")
    p.add_argument("--scheme", choices=SCHEMES,
                   help="weights/activations: a float dtype, or w4a16 (quantized on load unless MODEL already is); "
                        "default: as stored for fourbit checkpoints, else bf16 on CUDA and fp32 on CPU")
    p.add_argument("--group-size", type=int, default=128, help="w4a16 group size: 32, 64, 128 or -1 (per-channel)")
    p.add_argument("--sym", action="store_true", help="w4a16: symmetric codes (no zero points)")
    p.add_argument("--algo", default="rtn", choices=("rtn", "awq", "gptq"),
                   help="w4a16 quantization algorithm; awq and gptq calibrate on --calib text")
    p.add_argument("--act-order", action="store_true",
                   help="gptq: quantize columns by decreasing Hessian diagonal (static groups: same layout)")
    p.add_argument("--calib", metavar="FILE",
                   help="awq/gptq: UTF-8 calibration text, cut into --nsamples random windows of --seqlen tokens "
                        "(overlapping when the text is short); required except for dummy: models, which "
                        "calibrate on random token ids")
    p.add_argument("--nsamples", type=int, default=128, help="awq/gptq: calibration windows (default 128)")
    p.add_argument("--seqlen", type=int,
                   help="awq/gptq: tokens per calibration window (default: 512, or the model's context if shorter)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, dummy weights and calibration windows")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description="4-bit LLM quantization and inference")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt; prints only the generated text")
    _model_args(g)
    g.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 = off)")

    p = sub.add_parser("ppl", help="perplexity of a text file")
    _model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file, evaluated as one string")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, help="evaluate only this many tokens from the start")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")

    q = sub.add_parser("quantize", help="quantize a model (rtn, awq or gptq) and write a fourbit checkpoint")
    _model_args(q)
    q.add_argument("--out", required=True, help="output directory")

    e = sub.add_parser("export", help="write a w4a16 model as an AutoAWQ GEMM or GPTQ v1 checkpoint directory")
    _model_args(e)
    e.add_argument("--format", required=True, choices=("awq", "gptq"), help="checkpoint format to write")
    e.add_argument("--out", required=True, help="output directory (new or empty)")

    d = sub.add_parser("demo", help="quantize a dummy model and time a decode step, bf16 vs w4a16")
    d.add_argument("--preset", help="dummy preset (default: llama-2-7b on a GPU, tiny on a CPU)")
    d.add_argument("--group-size", type=int, default=128)
    d.add_argument("--device", help="default: cuda if available")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (/v1/completions, ...)")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model's name in the API (default: MODEL as given)")
    _engine_args(s)

    b = sub.add_parser("bench", help="benchmarks on a GPU: `bench gemm` (W4A16 vs cuBLAS, tinygemm, FP8), "
                                     "`bench e2e` (serving engine vs transformers)")
    b.add_argument("what", choices=("gemm", "e2e"))
    b.add_argument("--shapes", nargs="+", help="gemm: subset of the Llama layer shapes (default: all)")
    b.add_argument("--presets", nargs="+", default=["llama-2-7b", "llama-3-8b"], help="e2e: dummy model presets")
    b.add_argument("--schemes", nargs="+", default=["bf16", "w4a16"], choices=("bf16", "w4a16"), help="e2e")
    b.add_argument("--no-peer", action="store_true", help="e2e: skip the Hugging Face transformers peer")
    b.add_argument("--sweep", action="store_true", help="e2e: request-rate sweep against `fourbit serve` instead")
    b.add_argument("--m", type=int, nargs="+", help="batch sizes M (default: 1 16 32 64 128 256 512 1024 4096)")
    b.add_argument("--group-size", type=int, default=128)
    b.add_argument("--out", default="benchmarks/results", help="folder for <gpu>-w4a16|e2e.json and .md")
    return parser


def _engine_args(p: argparse.ArgumentParser):
    from .config import EngineConfig

    d = EngineConfig()
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences per step (largest batch)")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step (prefill chunks + decodes)")
    p.add_argument("--max-model-len", type=int, help="tokens per sequence, prompt + output (default: the model's)")
    p.add_argument("--kv-cache-fraction", type=float, default=d.kv_cache_fraction,
                   help="share of the GPU memory left beside the weights that the KV cache takes")
    p.add_argument("--num-blocks", type=int, help="KV cache blocks (overrides --kv-cache-fraction)")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV cache block")
    p.add_argument("--no-prefix-sharing", action="store_true", help="do not share identical prompt blocks")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's sampled tokens before scheduling the next (slower; for debugging)")
    p.add_argument("--max-queued", type=int, default=d.max_queued,
                   help="requests in flight before new ones get 503")


def _engine_config(args):
    from .config import EngineConfig

    return EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                        kv_cache_fraction=args.kv_cache_fraction, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                        prefix_sharing=not args.no_prefix_sharing, cuda_graphs=not args.no_cuda_graphs,
                        async_scheduling=not args.no_async_scheduling, max_queued=args.max_queued)


def _device(arg):
    import torch

    if arg:
        if arg.startswith("cuda") and not torch.cuda.is_available():
            from .errors import FourbitError

            raise FourbitError(f"--device {arg}: CUDA is not available here: use --device cpu")
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_cli(args):
    """The model the flags describe: loaded, then quantized when --scheme w4a16 asks for it."""
    import torch

    from . import api
    from .config import W4A16Config
    from .errors import FourbitError
    from .models.loader import hf_quantization_config

    device = _device(args.device)
    default = "bf16" if device.type == "cuda" else "fp32"
    config_json = Path(args.model) / "config.json"
    # a fourbit checkpoint, or an AutoAWQ / GPTQ directory (which may keep its config in a side file)
    quantized_source = config_json.is_file() and \
        hf_quantization_config(Path(args.model), json.loads(config_json.read_text())) is not None
    scheme = args.scheme or ("w4a16" if quantized_source else default)
    if quantized_source and scheme != "w4a16":
        raise FourbitError(f"{args.model} holds w4a16 weights: drop --scheme {scheme} (or use --scheme w4a16)")
    act = getattr(torch, FLOAT_DTYPES[scheme if scheme != "w4a16" else default])
    config = None
    if scheme == "w4a16":
        config = W4A16Config(group_size=args.group_size, sym=args.sym, algo=args.algo, act_order=args.act_order)
        if config.algo != "rtn":  # fail before loading the model, not after
            if args.nsamples < 1:
                raise FourbitError(f"--nsamples must be at least 1, got {args.nsamples}")
            if args.seqlen is not None and args.seqlen < 1:
                raise FourbitError(f"--seqlen must be at least 1, got {args.seqlen}")
            if args.calib is None and not args.model.startswith("dummy:") and not quantized_source:
                raise FourbitError(f"--algo {config.algo} needs calibration text: pass --calib FILE (UTF-8 text "
                                   f"like the model's training data); only dummy: models calibrate on random ids")
    model = api.load(args.model, act, device, args.seed)
    if config is not None and not quantized_source:
        calib = None if config.algo == "rtn" else _calibration(args, model)
        api.quantize_(model, config, calib)
    return model


def _calibration(args, model):
    """(nsamples, seqlen) token ids: windows of --calib text, or random ids for a dummy model without --calib."""
    from .quantize.calib import calib_tokens

    seqlen = args.seqlen or min(512, model.config.max_seq_len)
    if args.calib is None:  # a dummy model (checked before loading): it was trained on nothing
        return calib_tokens(None, nsamples=args.nsamples, seqlen=seqlen, seed=args.seed,
                            vocab_size=model.config.vocab_size)
    return calib_tokens(args.calib, _tokenizer(args, model), args.nsamples, seqlen, args.seed)


def _tokenizer(args, model):
    from .errors import FourbitError
    from .models.tokenizer import Tokenizer

    if args.tokenizer:
        tok = Tokenizer(args.tokenizer)
    else:
        src = Path(args.model)
        where = src.parent if src.is_file() else src
        if args.model.startswith("dummy:") or not any((where / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise FourbitError(f"no tokenizer found for {args.model}: pass --tokenizer FILE (.model or tokenizer.json)")
        tok = Tokenizer(where)
    if tok.vocab_size > model.config.vocab_size:
        raise FourbitError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model only "
                           f"{model.config.vocab_size}: pass the model's own tokenizer")
    return tok


def cmd_generate(args):
    import torch

    from .config import SamplingParams
    from .errors import FourbitError
    from .models.generate import generate
    from .models.tokenizer import TextStream, prompt_ids

    model = load_for_cli(args)
    tok = _tokenizer(args, model)
    prompt = prompt_ids(tok, args.prompt, model.config.bos_id)
    if not prompt:
        raise FourbitError("the prompt is empty and the tokenizer has no BOS token: pass --prompt TEXT")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    new: list[int] = []
    text = TextStream(tok, prompt)  # decoded after the prompt: the first word keeps its leading space

    def show(piece: str):
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def stream(_row, token):  # print the text as it grows (a partial UTF-8 character waits for its rest)
        new.append(token)
        show(text.add([token], final=False))

    t0 = time.perf_counter()
    generate(model, [prompt], params, seed=args.seed, on_token=stream)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    show(text.add([], final=True))
    if args.json:
        print(json.dumps({"text": text.text, "prompt_tokens": len(prompt), "new_tokens": len(new),
                          "seconds": round(seconds, 3), "tokens_per_s": round(len(new) / seconds, 2)}))


def cmd_ppl(args):
    from .errors import FourbitError
    from .eval.perplexity import perplexity

    model = load_for_cli(args)
    tok = _tokenizer(args, model)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FourbitError(f"cannot read --text {args.text}: {e}") from None
    result = perplexity(model, tok.encode(text, bos=True), args.seq_len, args.batch_size, args.max_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['ppl']:.4f}  (NLL {result['nll']:.4f} nats/token over {result['predictions']} "
              f"predictions in {result['windows']} windows of {result['seq_len']})")


def _optional_tokenizer(args, model):
    """The tokenizer to ship beside a written checkpoint: one the user named must load; a missing default is skipped."""
    from .errors import FourbitError

    try:
        return _tokenizer(args, model)
    except FourbitError:
        if args.tokenizer:
            raise
        return None


def cmd_quantize(args):
    from . import api
    from .errors import FourbitError

    if (args.scheme or "w4a16") != "w4a16":
        raise FourbitError(f"fourbit quantize writes w4a16 checkpoints: drop --scheme {args.scheme}")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # fail before the work, not after it
        raise FourbitError(f"--out {args.out} exists and is not a directory: choose another output directory")
    args.scheme = "w4a16"
    model = load_for_cli(args)
    tok = _optional_tokenizer(args, model)
    out = api.save(model, args.out, tok)
    if args.json:
        print(json.dumps({"out": str(out), "tokenizer": None if tok is None else tok.path.name}))
    else:
        print(f"wrote {out}" + ("" if tok else " (no tokenizer found: pass --tokenizer to include one)"))


def cmd_export(args):
    from . import api
    from .errors import FourbitError
    from .interop.exporter import check_out_dir

    if (args.scheme or "w4a16") != "w4a16":
        raise FourbitError(f"fourbit export writes w4a16 checkpoints: drop --scheme {args.scheme}")
    check_out_dir(Path(args.out))  # fail before the work, not after it
    args.scheme = "w4a16"
    model = load_for_cli(args)
    tok = _optional_tokenizer(args, model)
    out = api.export(model, args.out, args.format, tok)
    if args.json:
        print(json.dumps({"out": str(out), "format": args.format, "tokenizer": None if tok is None else tok.path.name}))
    else:
        hint = "" if tok else " (no tokenizer found: pass --tokenizer to include one)"
        print(f"wrote {out} ({args.format}){hint}")


def cmd_demo(args):
    from .demo import run_demo

    run_demo(_device(args.device), args.preset, args.group_size, args.seed, args.json)


def cmd_serve(args):
    from .engine.llm import LLM, AsyncLLM
    from .engine.server import serve

    config = _engine_config(args)  # bad engine flags fail before the model loads
    model = load_for_cli(args)
    if args.model.startswith("dummy:") and not args.tokenizer:  # random weights: token ids are the words
        from .models.tokenizer import IdTokenizer

        c = model.config
        tok = IdTokenizer(c.vocab_size, c.bos_id, c.eos_ids[0] if c.eos_ids else None)
    else:
        tok = _tokenizer(args, model)
    llm = LLM(model, tok, config, seed=args.seed)
    llm.warmup()
    serve(AsyncLLM(llm, args.served_model_name or args.model), args.host, args.port)


def cmd_bench(args):
    import torch

    from .bench import M_VALUES, SHAPES, run_gemm_bench
    from .errors import FourbitError

    if not torch.cuda.is_available():
        raise FourbitError(f"fourbit bench {args.what} needs a CUDA GPU")
    if args.what == "e2e":
        from .bench_e2e import run_e2e_bench, run_sweep

        if args.sweep:
            return run_sweep(args.presets, args.schemes, args.out)
        return run_e2e_bench(args.presets, args.schemes, not args.no_peer, args.out)
    unknown = set(args.shapes or ()) - set(SHAPES)
    if unknown:
        raise FourbitError(f"unknown shapes {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    run_gemm_bench(args.shapes, tuple(args.m or M_VALUES), args.group_size, args.out)


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "ppl": cmd_ppl, "quantize": cmd_quantize, "export": cmd_export,
            "demo": cmd_demo, "bench": cmd_bench}


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .errors import FourbitError

    try:
        COMMANDS[args.command](args)
    except (FourbitError, OSError) as e:  # OSError: unreadable inputs, unwritable outputs, a full disk
        print(f"fourbit: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
