"""loraflow: train, compile and serve mixed-adapter LoRA models as three gRPC services."""

__version__ = "0.1.0"
