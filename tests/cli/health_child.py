"""A real gRPC server with only the health service, for supervisor tests: `python health_child.py PORT
[--crash-once-after SECONDS MARKER]` exits with code 3 after SECONDS the first time (MARKER records it)."""

from __future__ import annotations

import argparse
import faulthandler
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SHUTDOWN_LIMIT = 10.0  # seconds from SIGTERM to a forced exit with a stack dump


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--crash-once-after", nargs=2, metavar=("SECONDS", "MARKER"))
    args = parser.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()

    def on_term(*_):
        # The supervisor tests read this line to tell "SIGTERM never came" from "it came and shutdown hung";
        # a shutdown still running after SHUTDOWN_LIMIT dumps every thread's stack to the log and exits.
        print("health_child: SIGTERM", flush=True)
        faulthandler.dump_traceback_later(SHUTDOWN_LIMIT, exit=True, file=sys.stdout)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    if args.crash_once_after:
        seconds, marker = float(args.crash_once_after[0]), Path(args.crash_once_after[1])
        if not marker.exists():
            time.sleep(seconds)
            marker.write_text("crashed")
            return 3
    while not stop.wait(0.1):
        pass
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
