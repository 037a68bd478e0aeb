"""Pieces of the fused ONNX Runtime graph (issue 8): today the MatMulNBits weight quantiser."""
