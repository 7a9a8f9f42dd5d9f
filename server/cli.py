"""``talan-serve``: resolve a model name, start an engine, serve the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from server.backends import BACKENDS, backend_class
from server.backends.template import UsageError

logger = logging.getLogger("talan-serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="talan-serve",
        description="OpenAI-compatible server for TALAN models, in vLLM (the default) or "
                    "SGLang (--engine sglang).",
    )
    p.add_argument("--model", default=None,
                   help="registry name (default: smollm2-talan-demo), a TALAN checkpoint "
                        "directory, or a plain HF model directory")
    p.add_argument("--talan", default=None, metavar="CKPT",
                   help="TALAN checkpoint directory to apply to --model")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the checkpoint's LoRA into the weights at load, so that only "
                        "TALAN runs per token (default); --no-merge-lora serves it per "
                        "request through the engine's multi-LoRA path (DoRA: always merged)")
    p.add_argument("--adapters", nargs="+", default=None, metavar="NAME=CKPT",
                   help="serve many TALAN(+LoRA) checkpoints on --model's base model, each "
                        "chosen by its NAME in a request's 'model' (both engines); "
                        "--model's own checkpoint, if it is one, is served beside them")
    p.add_argument("--max-adapters", type=int, default=8,
                   help="adapters loaded at once (and LoRAs in one batch) on a server of many")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="largest LoRA rank an adapter may have (default: the largest of "
                        "--adapters and of the --adapter-dir checkpoints there at start)")
    p.add_argument("--max-talan-slots", type=int, default=None,
                   help="slots of each request's TALAN state: the largest T an adapter "
                        "may have (default: the largest of --adapters and of the "
                        "--adapter-dir checkpoints there at start)")
    p.add_argument("--talan-connection-points", nargs="+", default=(), metavar="POINT",
                   help="connection points (embedding, layer_N) to run side paths at, beyond "
                        "those of the adapters given at start; with none given, this alone "
                        "makes a server of many adapters, all loaded at run time")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="serve every checkpoint folder directly under DIR on --model's base "
                        "model, by its folder name, loaded on its first request and evicted "
                        "least recently used beyond --max-adapters (--adapters stay pinned); "
                        "may be given more than once (docs/adapters.md)")
    p.add_argument("--adapter-cache-bytes", type=int, default=2**30,
                   help="host memory kept for evicted adapters of --adapter-dir, so that a "
                        "reload skips the disk and the validation (default 1 GiB; 0: none)")
    p.add_argument("--adapter-queue-size", type=int, default=64,
                   help="requests that may wait for their adapter to be loaded; beyond, 429")
    p.add_argument("--allowed-adapter-dirs", nargs="+", default=(), metavar="DIR",
                   help="directories from which POST /v1/load_lora_adapter may load "
                        "checkpoints (default: none; loading at run time is off)")
    p.add_argument("--engine", default="vllm", choices=tuple(BACKENDS),
                   help="the inference engine (default: vllm; sglang runs from its own "
                        "environment, ./scripts/setup_sglang.sh)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TALAN_SERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (env TALAN_SERVE_API_KEY)")
    p.add_argument("--deterministic", action="store_true",
                   help="a request's output does not depend on other in-flight requests")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--checkpoint-root", default=None,
                   help="folder holding registry checkpoints (env TALAN_SERVE_CHECKPOINT_ROOT)")
    p.add_argument("--served-model-name", default=None,
                   help="name clients use in the 'model' field (default: --model)")
    p.add_argument("--dtype", default="auto",
                   help="weights and activations (default: float32 without a GPU: the "
                        "reference's dtype, and faster than bf16 beyond batch 1 on CPUs "
                        "without AVX-512 BF16; the engine's choice on a GPU)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="engine batch limit (sequences decoded together)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="admitted requests beyond which the server answers 429")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds SIGTERM waits for in-flight requests before exiting")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer over this many workers (TALAN runs on each)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages (TALAN runs on the stage "
                        "holding its layer)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="whole-model replicas behind one server, each with its own batch")
    p.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default=None,
                   help="how the engine runs its workers: local processes (mp) or a Ray "
                        "cluster, for more than one node (vLLM; default: the engine's "
                        "choice)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="the KV cache's size in bytes (vLLM; default: vLLM's own sizing on "
                        "a GPU, 1 GiB without one)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="skip graph capture/compilation (default: on without a GPU, where "
                        "vLLM's compiled CPU mode decodes slower and starts slower; off "
                        "with one, where CUDA graphs pay; docs/benchmarks.md)")
    p.add_argument("--tool-call-parser", default="auto", metavar="NAME",
                   help="how tool calls are read from chat output with tool_choice 'auto': "
                        "any parser of the engine's registry (vLLM's tool parsers, SGLang's "
                        "function-call parsers), auto (the format the model's chat template "
                        "renders tools in) or none")
    p.add_argument("--reasoning-parser", default="auto", metavar="NAME",
                   help="how a reasoning model's reasoning is split from its answer "
                        "(reasoning_content): any parser of the engine's registry, auto "
                        "(from the chat template: Qwen3's, DeepSeek-R1's) or none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="info")
    return p


@dataclass
class ServedModel:
    """What to serve, resolved from the arguments before any engine is built."""

    served_name: str
    model_dir: str
    checkpoint: str | None
    # A server of many adapters: name -> checkpoint (``served_name`` is the base model).
    adapters: dict[str, str] = field(default_factory=dict)


def resolve(args: argparse.Namespace) -> ServedModel:
    from talan_serve.checkpoint import read_manifest
    from talan_serve.registry import DEFAULT_MODEL, resolve_model

    name = args.model or DEFAULT_MODEL
    resolved = resolve_model(name, args.checkpoint_root)
    checkpoint = args.talan or (str(resolved.checkpoint) if resolved.checkpoint else None)
    served = args.served_model_name or name
    if not args.adapters and not args.talan_connection_points and not args.adapter_dir:
        return ServedModel(served, str(resolved.base_model), checkpoint)
    for directory in args.adapter_dir:
        if not Path(directory).is_dir():
            raise UsageError(f"--adapter-dir {directory}: no such directory")
    if args.talan:
        raise UsageError("--talan with --adapters: give that checkpoint as NAME=CKPT")
    if args.data_parallel_size > 1:
        # Adapters are loaded into the workers of one engine; replicas would not all get them.
        raise UsageError("--adapters (or --adapter-dir) with --data-parallel-size: run one "
                         "server per replica")
    adapters: dict[str, str] = {}
    base_name = served
    if checkpoint is not None:
        # --model is a checkpoint: served beside the others, under its own name.
        adapters[served] = checkpoint
        base_name = read_manifest(checkpoint)["base_model"]
    for item in args.adapters or ():
        adapter, sep, path = item.partition("=")
        if not sep or not adapter or not path:
            raise UsageError(f"--adapters {item!r}: expected NAME=CKPT")
        if adapter in adapters or adapter == base_name:
            raise UsageError(f"--adapters: the name {adapter!r} is used twice")
        if not Path(path).is_dir():
            raise UsageError(f"--adapters {item!r}: no such checkpoint directory")
        adapters[adapter] = path
    if args.adapter_dir and len(adapters) >= args.max_adapters:
        raise UsageError(f"{len(adapters)} adapters given at start are pinned, and "
                         f"--max-adapters {args.max_adapters} leaves no place for "
                         "--adapter-dir; raise --max-adapters")
    return ServedModel(base_name, str(resolved.base_model), None, adapters)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend = backend_class(args.engine)
    missing = backend.missing()
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    from talan_serve.registry import MissingCheckpointError, UnknownModelError

    try:
        served = resolve(args)
        if args.talan is not None and not Path(args.talan).is_dir():
            raise UsageError(f"--talan {args.talan}: no such checkpoint directory")
        backend.configure(args)
    except (MissingCheckpointError, UnknownModelError, UsageError) as error:
        print(f"talan-serve: {error}", file=sys.stderr)
        return 2
    return serve(args, served)


def start_backend(args: argparse.Namespace, served: ServedModel):
    """The engine, started with the command line's settings."""
    from server.backends import make_backend

    return make_backend(
        args.engine, model_dir=served.model_dir, served_name=served.served_name,
        talan_checkpoint=served.checkpoint, merge_lora=args.merge_lora,
        max_model_len=args.max_model_len, dtype=args.dtype,
        deterministic=args.deterministic, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, seed=args.seed,
        adapters=served.adapters, max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank, talan_state_slots=args.max_talan_slots,
        talan_connection_points=tuple(args.talan_connection_points),
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        adapter_dirs=tuple(args.adapter_dir), adapter_cache_bytes=args.adapter_cache_bytes,
        adapter_queue_size=args.adapter_queue_size,
    )


def serve(args: argparse.Namespace, served: ServedModel) -> int:
    import uvicorn

    from server.app import create_app
    from server.state import ServerSettings

    logger.info("serving %s (model %s, TALAN %s) with %s", served.served_name,
                served.model_dir, served.checkpoint or (
                    f"adapters {', '.join(served.adapters)}" if served.adapters else "none"),
                args.engine)
    # Bound before the engine starts, as vLLM's own server does: the engine's processes
    # take free ports of their own while they start, and a port not yet bound may be one.
    try:
        listener = bind_listener(args.host, args.port)
    except OSError as error:
        print(f"talan-serve: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    try:
        backend = start_backend(args, served)
    except UsageError as error:  # found once the model's files are read (its parsers)
        print(f"talan-serve: {error}", file=sys.stderr)
        listener.close()
        return 2
    # The engine runs in its own processes; what torch does here (checking an adapter
    # before it loads) is small, and a second intra-op thread spinning after each op
    # took a core from the engine's decoding (docs/adapters.md).
    import torch

    torch.set_num_threads(1)
    info = backend.info
    logger.info("serving %s in %s: TALAN %s, LoRA %s; parsers: reasoning %s, tool calls %s",
                info.name, info.dtype, "on (per-request switch)" if info.talan else "none",
                {"merged": "merged into the weights (--no-merge-lora: per request)",
                 "per_request": "served per request"}.get(info.lora_mode, "none"),
                info.reasoning_parser or "none", info.tool_parser or "none")
    settings = ServerSettings(api_key=args.api_key, max_queued_requests=args.max_queued_requests,
                              max_body_bytes=args.max_body_bytes,
                              deterministic=args.deterministic,
                              adapter_dirs=tuple(Path(d) for d in args.allowed_adapter_dirs))
    server = None

    def stop_on_engine_death() -> None:
        server.admission.draining = True
        server.should_exit = True

    app = create_app(backend, settings, on_engine_dead=stop_on_engine_death)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout,
                            timeout_keep_alive=5)
    server = DrainingServer(config)
    server.admission = app.state.server.admission
    server.run(sockets=[listener])
    if app.state.server.engine_dead:
        print("talan-serve: the engine died; exiting with status 1", file=sys.stderr)
        return 1
    return 0


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's socket, bound to ``host:port`` (not yet listening: until the engine is
    up, a connection is refused rather than left waiting)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _draining_server_class():
    import uvicorn

    class Draining(uvicorn.Server):
        """uvicorn already stops accepting and waits for in-flight requests on SIGTERM;
        this also answers 503 to new requests on kept-alive connections meanwhile."""

        admission = None

        def handle_exit(self, sig, frame) -> None:
            if self.admission is not None:
                self.admission.draining = True
            super().handle_exit(sig, frame)

    return Draining


def DrainingServer(config):  # noqa: N802 - a class factory, uvicorn is imported lazily
    return _draining_server_class()(config)


if __name__ == "__main__":
    sys.exit(main())
