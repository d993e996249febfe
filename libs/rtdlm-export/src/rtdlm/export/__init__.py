"""rtdlm.export: turning trained parameters into deployable artefacts."""

from rtdlm.export.quantize import (
    QuantizedTensor,
    dequantize_params,
    dequantize_tensor,
    nbytes,
    quantize_params,
    quantize_tensor,
)

__all__ = [
    "QuantizedTensor",
    "dequantize_params",
    "dequantize_tensor",
    "nbytes",
    "quantize_params",
    "quantize_tensor",
]
