"""loraflow: train, compile and serve mixed-adapter LoRA models as three gRPC services."""

__version__ = "0.1.0"

__all__ = ["Client", "JobFailed", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import loraflow.errors` in a service does not pull in every client stub.
    if name in ("Client", "JobFailed"):
        from loraflow import client

        return getattr(client, name)
    raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
