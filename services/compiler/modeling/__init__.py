"""The static-shape multi-LoRA decoder (Llama / Mistral / Qwen2) the compiler exports."""

from services.compiler.modeling.config import SUPPORTED_ARCHITECTURES, DecoderConfig
from services.compiler.modeling.decoder import MultiLoraDecoder, load_decoder, weight_files

__all__ = ["SUPPORTED_ARCHITECTURES", "DecoderConfig", "MultiLoraDecoder", "load_decoder", "weight_files"]
