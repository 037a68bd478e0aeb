"""loraflow: train, compile and serve mixed-adapter LoRA models as three gRPC services."""

__version__ = "0.1.0"

__all__ = ["AutoLoraModelForCausalLM", "Client", "JobFailed", "__version__", "apply_peft", "finetune",
           "register_adapters"]

_API_NAMES = ("AutoLoraModelForCausalLM", "apply_peft", "finetune", "register_adapters")


def __getattr__(name: str):
    # Lazy, so `import loraflow.errors` in a service (or the CLI) does not pull in every client stub,
    # nor the compiler and engine libraries the Python API needs.
    if name in ("Client", "JobFailed"):
        from loraflow import client

        return getattr(client, name)
    if name in _API_NAMES:
        from loraflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'loraflow' has no attribute {name!r}")
