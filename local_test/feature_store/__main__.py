"""Command line: ``python -m local_test.feature_store serve --port PORT --db PATH``."""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from local_test.feature_store.faults import RATE_FIELDS, FaultConfig, FaultInjector
from local_test.feature_store.server import FeatureStoreHTTPServer
from local_test.feature_store.store import Store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local_test.feature_store",
                                     description="A local SageMaker Feature Store.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the Feature Store runtime and FeatureGroup APIs on one port")
    serve.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one (printed at start)")
    serve.add_argument("--db", type=Path, required=True,
                       help="SQLite file holding groups and records (created if absent)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    for rate in RATE_FIELDS:
        serve.add_argument(f"--{rate.replace('_', '-')}", type=float, default=0.0, help="injected fault rate, 0 to 1")
    serve.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every runtime request")
    serve.add_argument("--seed", type=int, default=None, help="seed of the fault generator")
    serve.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or SIGINT; print one line once it accepts connections."""
    settings = {rate: getattr(args, rate) for rate in RATE_FIELDS}
    try:
        faults = FaultInjector(FaultConfig.from_mapping({**settings, "latency_ms": args.latency_ms, "seed": args.seed}))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.db.parent.is_dir():
        print(f"error: --db {args.db}: directory {args.db.parent} does not exist", file=sys.stderr)
        return 2
    try:
        store = Store(args.db)
    except sqlite3.Error as error:
        print(f"error: --db {args.db}: cannot open it as SQLite: {error}", file=sys.stderr)
        return 1
    try:
        server = FeatureStoreHTTPServer((args.host, args.port), store, faults, args.log_requests)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error.strerror}", file=sys.stderr)
        return 1

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # serve_forever runs in a thread because shutdown() must be called from another thread.
    worker = threading.Thread(target=server.serve_forever, name="feature-store-http", daemon=True)
    worker.start()
    print(f"Feature Store listening on {server.url}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the command; return the exit status."""
    args = _parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
