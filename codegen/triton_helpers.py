"""@triton.jit helpers shared by the kernel templates in codegen/templates/ (which import them by
module path, so one definition serves every template)."""
import triton
import triton.language as tl


@triton.jit
def round_bf16(v):
    # Triton's CPU interpreter truncates fp32 -> bf16; round to nearest even first, as the GPU does.
    u = v.to(tl.uint32, bitcast=True)
    u = (u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return tl.where(v != v, v, u.to(tl.float32, bitcast=True))  # noqa: PLR0124  (NaN test)
