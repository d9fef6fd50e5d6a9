"""Which dtype the class tiles are multiplied in: one rule for every backend.

Face-recognition training keeps an fp32 master weight and (under AMP) bf16/fp16 embeddings.
Copying the weight to bf16 before the loss would cost a C x D write and read per step; the
Triton kernel instead loads the fp32 tile and casts it in registers. The chunked backend does
the same arithmetic in torch (rounds each tile, multiplies in fp32) so that a CPU run computes
what the GPU computes, and the tests can compare them.

``precision``:
  ``"bf16"`` / ``"fp16"``  tiles of x_hat and W rounded to that dtype, fp32 accumulation,
                           fp32 log-sum-exp; the backward's probability tiles too.
  ``"tf32"``               fp32 inputs, TF32 tensor-core dots (10-bit mantissa, round to
                           nearest, ties away from zero, as the hardware conversion does).
  ``"ieee"``               full fp32 (or float64) products.
  ``"auto"``               bf16/fp16 when autocast is on for that dtype on the inputs' device
                           or the embeddings are bf16/fp16; otherwise tf32 when torch allows
                           TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
                           ``torch.get_float32_matmul_precision() != "highest"``); else ieee.
                           float64 embeddings always resolve to ieee.
"""
# B: batch, D: embedding dim
import torch

PRECISIONS = ("auto", "bf16", "fp16", "tf32", "ieee")
TILE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def tf32_allowed() -> bool:
    """What torch itself would do with an fp32 matmul on CUDA."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or \
        torch.get_float32_matmul_precision() != "highest"


def resolve_precision(precision: str, emb_hat_BD: torch.Tensor) -> str:
    """The concrete precision (``bf16 | fp16 | tf32 | ieee``) of one call."""
    check_precision(precision)
    if precision != "auto":
        return precision
    if emb_hat_BD.dtype == torch.float64:
        return "ieee"
    device_type = emb_hat_BD.device.type
    if torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
        for name, dtype in TILE_DTYPES.items():
            if autocast_dtype == dtype:
                return name
    for name, dtype in TILE_DTYPES.items():
        if emb_hat_BD.dtype == dtype:
            return name
    return "tf32" if tf32_allowed() else "ieee"


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest TF32 value (ties away from zero), kept as fp32."""
    bits = t.contiguous().view(torch.int32)
    # Adding half an ulp of the 10-bit mantissa to the magnitude bits, then clearing the 13
    # dropped bits, rounds ties away from zero (cvt.rna.tf32.f32).
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def round_tile(t: torch.Tensor, precision: str, acc_dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded as the kernel rounds a tile for ``precision``, returned in ``acc_dtype``."""
    if precision in TILE_DTYPES:
        return t.to(TILE_DTYPES[precision]).to(acc_dtype)
    if precision == "tf32":
        return round_tf32(t.to(torch.float32)).to(acc_dtype)
    return t.to(acc_dtype)
