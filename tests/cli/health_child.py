"""A real gRPC server with only the health service, for supervisor tests: `python health_child.py PORT
[--crash-once-after SECONDS MARKER]` exits with code 3 after SECONDS the first time (MARKER records it)."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


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
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
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
