"""`tipslab serve INDEX_DIR [INDEX_DIR ...]`: the search service and page over index directories."""

from __future__ import annotations

import argparse

from tipslab.errors import TipslabError


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve index directories over HTTP: a JSON search API and a search page",
        description="Load one or more index directories and their models once, then answer text and "
                    "region queries over HTTP (POST /api/search, GET /api/indexes, /api/health, heatmap, "
                    "crop and image endpoints) and serve a search page at /.")
    parser.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR", help="index directories written by `tipslab index`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--model", default=None, metavar="MODEL_PATH",
                        help="the model to embed queries with (default: each index's own copy, else its recorded path)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when present, else cpu)")
    parser.set_defaults(func=run_serve)
    return parser


def run_serve(args) -> int:
    from tipslab.retrieval.service import load_indexes
    from tipslab.retrieval.service_app import bind, run

    if not 0 < args.port < 65536:
        raise TipslabError(f"--port {args.port}: expected a port number in 1..65535")
    sock = bind(args.host, args.port)
    try:
        indexes = load_indexes(args.index_dirs, model=args.model, device=args.device)
        for served in indexes.values():
            info = served.info()
            print(f"index {info['name']}: {info['images']} images, {info['vectors']} vectors ({info['path']})")
        print(f"serving on http://{args.host}:{args.port}/  (API: /api/search, docs: /api/docs; Ctrl-C stops)",
              flush=True)
        run(indexes, sock)
    finally:
        sock.close()
    return 0
