"""The static-shape multi-LoRA decoder (Llama / Mistral / Qwen2) the compiler exports."""

from services.compiler.modeling.checkpoint import Checkpoint, weight_files
from services.compiler.modeling.config import SUPPORTED_ARCHITECTURES, DecoderConfig
from services.compiler.modeling.decoder import MultiLoraDecoder, load_decoder
from services.compiler.modeling.weights import CheckpointWeights, ModuleWeights, WeightSource

__all__ = ["SUPPORTED_ARCHITECTURES", "Checkpoint", "CheckpointWeights", "DecoderConfig", "ModuleWeights",
           "MultiLoraDecoder", "WeightSource", "load_decoder", "weight_files"]
