"""`mllm serve`: an OpenAI-compatible HTTP API (chat completions, streaming) for a model, on loopback by default."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm.cli.arguments import add_device_arguments, add_listen_arguments, load_model, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm serve", description=__doc__.split("\n")[0].split(": ", 1)[1])
    add_listen_arguments(parser, "server", 8000, any_port=True)
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the model folder's name)")
    parser.add_argument("--max-batch", type=positive_int, default=8,
                        help="most queued non-streamed greedy requests answered in one batch")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder whose files requests may name by local path or file:// URL (default: none; "
                             "only data URIs)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (info logs every request)")
    add_device_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.image_root is not None and not args.image_root.is_dir():
        parser.error(f"--image-root {args.image_root}: not a directory")
    from mllm.model.loading import default_model_dir
    from mllm.serve.openai_api import create_app, serve

    model, tokenizer, processor = load_model(parser, args)
    name = args.served_model_name or Path(args.model or default_model_dir()).resolve().name
    app = create_app(model, tokenizer, processor, name, max_batch=args.max_batch, image_root=args.image_root)
    try:
        serve(app, args.host, args.port, log_level=args.log_level,
              announce=lambda url: print(f"serving {name!r} on {url}/v1 (OpenAI API; Ctrl-C stops)", flush=True))
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the Ctrl-C: a normal stop
        print("mllm serve: stopped", file=sys.stderr)
    except OSError as err:  # the port is taken, the address is not ours ...
        print(f"mllm serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0
