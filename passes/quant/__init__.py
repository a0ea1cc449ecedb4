"""Numeric core of fxforge quantization (issue 4): formats as data, reference quantize / dequantize,
Hadamard rotations, KIVI KV-cache quantization and error / bytes metrics. Pure PyTorch (CPU or GPU).

formats   QuantFormat, FORMATS registry, quantize / dequantize, QuantizedTensor (safetensors-friendly)
hadamard  hadamard_matrix, fwht, rotate_weight / rotate_activation (block-diagonal or full)
kv        kivi_quantize / kivi_dequantize (2/4-bit, per-channel K, per-token V, fp residual window)
metrics   sqnr_db, bytes_per_weight
"""
from .formats import (
    ELEMENTS,
    FORMATS,
    ElemSpec,
    QuantFormat,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    get_format,
    pack_nibbles,
    quantize,
    unpack_nibbles,
)
from .hadamard import (
    fwht,
    hadamard_matrix,
    random_signs,
    rotate_activation,
    rotate_weight,
    rotation_matrix,
)
from .kv import KIVICache, kivi_bytes_per_token, kivi_dequantize, kivi_quantize
from .metrics import bytes_per_weight, sqnr_db

__all__ = ["ELEMENTS", "FORMATS", "ElemSpec", "KIVICache", "QuantFormat", "QuantizedTensor", "bytes_per_weight",
           "dequantize", "fake_quantize", "fwht", "get_format", "hadamard_matrix", "kivi_bytes_per_token",
           "kivi_dequantize", "kivi_quantize", "pack_nibbles", "quantize", "random_signs", "rotate_activation",
           "rotate_weight", "rotation_matrix", "sqnr_db", "unpack_nibbles"]
