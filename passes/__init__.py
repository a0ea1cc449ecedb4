"""Built-in graph passes (``fxforge.passes``). Importing this package registers them."""
from .cleanup import CSE, ConstantFold, DeadCodeElimination, RemoveNoops
from .fuse_attention import FuseAttention
from .merge_linears import MergeLinears
from .patch_conv import PatchConvToMatmul
from .quant.kv_pass import KIVIKVCache  # noqa: F401  (registers the kivi_cache pass)
from .quant.quantize_pass import Quantize  # noqa: F401  (registers the quantize pass)
from .quant.w8a8_pass import QuantizeW8A8  # noqa: F401  (registers the quantize_w8a8 pass)
from .simplify import CatSign
from .state import GQAAttention, ReinplaceStateUpdates
from .winograd_conv import WinogradConv

__all__ = ["CSE", "CatSign", "ConstantFold", "DeadCodeElimination", "FuseAttention", "GQAAttention", "MergeLinears", "PatchConvToMatmul", "ReinplaceStateUpdates", "RemoveNoops", "WinogradConv"]
