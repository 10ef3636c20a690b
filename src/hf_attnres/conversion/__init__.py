"""Convert Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3) into AttnRes models equal at initialisation."""

from .convert import ConversionReport, ConvertConfig, convert_checkpoint
from .families import SUPPORTED_FAMILIES, UnsupportedModelError
from .verify import Verification, VerificationError

__all__ = [
    "ConversionReport",
    "ConvertConfig",
    "SUPPORTED_FAMILIES",
    "UnsupportedModelError",
    "Verification",
    "VerificationError",
    "convert_checkpoint",
]
