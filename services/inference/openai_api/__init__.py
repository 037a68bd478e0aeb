"""The OpenAI-compatible HTTP API of the inference service (``--http-listen``): /v1/models,
/v1/completions, /v1/chat/completions on the same ModelManager and engines as the gRPC API."""
