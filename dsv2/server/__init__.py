"""`dsv2 serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn), and a chat page."""

from __future__ import annotations

import argparse
import gc
import os

BUNDLED_NAME = "dsv2-bundled"


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server with a chat page at /")
    p.add_argument("--model", default=None, help="HF-format model directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("DSV2_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DSV2_API_KEY; unset: open)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model ids clients may send; responses name the one asked for, /v1/models "
                        f"lists them all (default: --model as given, or {BUNDLED_NAME})")
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="a Jinja chat template (its file, or the text itself) in place of the tokenizer's")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto", help="auto, bfloat16, float16, float32, fp8 or 6bit")
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="hold the weights in FP8 (a bf16 checkpoint is quantized as it loads; an FP8 "
                        "checkpoint, from `dsv2 quantize`, is FP8 without this flag)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV-cache pages (default: sized from memory)")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="GPUs (CPU processes) the model is split over; this process starts the others "
                        "(under torchrun: the launched processes, default their number; docs/parallel.md)")
    p.add_argument("--data-parallel-attention", action="store_true",
                   help="with --tensor-parallel-size N: each rank runs attention for its own requests over "
                        "its own cache, the MoE layers shared: N times the cache (runs eagerly; docs/parallel.md)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs, no compilation")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling and capturing the step kinds at startup (CUDA): the first "
                        "requests then wait for them")
    p.add_argument("--no-compile", action="store_true",
                   help="CUDA graphs without torch.compile: no compile pauses at new step shapes")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights of the model directory's config.json shape (benchmarks)")
    p.add_argument("--max-pending", type=int, default=1024,
                   help="requests in flight beyond which new ones get 429 with Retry-After")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="larger request bodies get 413 before they are read (default: 64 bytes a token of "
                        "--max-model-len, at least 1 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request may take to send its body (then 408)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to start a request, from connecting or from its "
                        "previous response (then it is closed)")
    p.add_argument("--max-connections", type=int, default=4096,
                   help="open connections beyond which new ones get 503 with Retry-After")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are cut")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    import torch.distributed as dist

    from ..resources import bundled_model_dir
    from ..tokenizer import read_chat_template
    from ..engine.async_llm import AsyncLLM
    from ..engine.llm import LLM
    from ..engine.workers import join_torchrun, launched_by_torchrun
    from .app import Server, create_app
    from .lifecycle import ServeProcess
    from .limits import Limits, default_max_request_bytes, guarded_http, raise_open_files_limit

    if args.max_pending < 1:
        raise ValueError(f"--max-pending must be at least 1, got {args.max_pending}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be at least 0, got {args.shutdown_timeout}")
    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be positive, got {args.max_request_bytes}")
    model = args.model or bundled_model_dir()
    template = None if args.chat_template is None else read_chat_template(args.chat_template)
    settings = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                    gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
                    num_blocks=args.num_blocks, enforce_eager=args.enforce_eager, load_format=args.load_format,
                    compile=not args.no_compile, quantization=args.quantization,
                    data_parallel_attention=args.data_parallel_attention)
    tp = args.tensor_parallel_size or 1
    if launched_by_torchrun():  # every rank runs this command: rank 0 serves, the others follow it
        tp = join_torchrun(args.tensor_parallel_size, args.device)
        if dist.get_rank() != 0:
            LLM.follow(model, **settings)
            return 0
    engine = AsyncLLM(model, warmup=False if args.no_warmup else None, tensor_parallel_size=tp, **settings)
    if engine.warmup_report is not None:
        w = engine.warmup_report
        print(f"dsv2 serve: warmed up in {w['seconds']:.1f} s (decode batches {w['batch_sizes']}, "
              f"a {w['long_prompt']}-token prompt)", flush=True)
    if template is not None:
        engine.tokenizer.chat_template = template
    name = args.served_model_name or [args.model or BUNDLED_NAME]
    limits = Limits(args.max_request_bytes or default_max_request_bytes(engine.engine.max_model_len),
                    args.body_timeout, args.header_timeout, args.max_connections)
    open_files = raise_open_files_limit(limits.max_connections + 256)
    if open_files < limits.max_connections + 64:
        print(f"dsv2 serve: warning: {open_files} open files allowed (ulimit -n), fewer than "
              f"--max-connections {limits.max_connections} needs", flush=True)
    server = Server(engine, name, args.api_key, args.max_pending, limits)
    # uvicorn's own request parser, behind the connection cap and header deadline; its backstop for
    # connections still open once the drain is over stays short: the drain already waited
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                            http=guarded_http(server.guard), timeout_graceful_shutdown=5)
    process = ServeProcess(config, server, args.shutdown_timeout)
    # Everything loaded so far lives as long as the server: out of the collector's sight, a full
    # collection stays short (the first one otherwise stalled the event loop ~200 ms on a CPU
    # machine, in the first burst of connections)
    gc.collect()
    gc.freeze()
    print(f"dsv2 serve: {', '.join(name)} on http://{args.host}:{args.port} (chat page at /, API at /v1)", flush=True)
    process.run()
    return process.exit_code
