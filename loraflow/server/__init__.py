"""Server plumbing shared by the three services: the gRPC bootstrap (grpc_server), errors as gRPC
statuses (error_status), message and concurrency limits, the health probes (redis_health) and
the bounded pool for model-sized request preparation (preparation)."""
