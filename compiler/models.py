"""Built-in small models for fxforge.

These are the reference workloads used by the CLI (``--model NAME``), the test
suite and the GPU benchmarks. They are written in plain ``torch.nn`` so that
they trace and export cleanly with ``torch.export`` / FX, and they cover the
patterns the compiler has to handle: attention via
``F.scaled_dot_product_attention``, GQA head repetition, RoPE, RMSNorm computed
in float32, LayerNorm, exact GELU, SwiGLU, convolutions, BatchNorm and pooling.

Conventions:

* Every factory in :data:`BUILTIN_MODELS` returns a float32 module in eval mode
  whose weights depend only on the ``seed`` argument. Callers cast with
  ``model.to(dtype)``.
* ``example_inputs(batch, device, dtype)`` returns a tuple of inputs: float
  tensors in ``dtype``, token ids as int64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- Llama-style building blocks -------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama). Computes in float32 for stability in
    half precision, then casts back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f32 = x.float()
        normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_cos_sin(
    seq_len: int | torch.SymInt,
    head_dim: int,
    base: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables of shape [seq_len, head_dim] in the HF Llama convention:
    the half-size frequency table is duplicated so ``rotate_half`` applies."""
    # Tables are built in float32 regardless of ``dtype``: bf16 positions
    # lose integer precision past 256.
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the last dim [x1, x2] to [-x2, x1]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [B, H, T, D] by cos/sin: [T, D] (broadcast over B and H)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * n_rep, T, D], each kv head repeated
    n_rep times consecutively (same layout as ``repeat_interleave`` on dim 1).
    expand+reshape keeps the graph to view ops plus one copy."""
    if n_rep == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h_kv, n_rep, t, d).reshape(b, h_kv * n_rep, t, d)


class LlamaBlock(nn.Module):
    """Pre-norm Llama decoder block: GQA causal attention with RoPE, then a
    SwiGLU MLP, each wrapped in a residual connection."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        ffn_dim: int,
        max_seq: int = 2048,
        eps: float = 1e-6,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"dim {dim} not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads {n_heads} not divisible by n_kv_heads {n_kv_heads}")
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        # Informational context limit (benchmarks size inputs from it); not
        # checked in forward so exported graphs carry no shape guard for it.
        self.max_seq = max_seq
        self.rope_base = rope_base

        self.attn_norm = RMSNorm(dim, eps)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

        self.mlp_norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # RoPE tables come from the runtime sequence length so the block has
        # no fixed-size buffers and exports with dynamic T.
        cos, sin = rope_cos_sin(t, self.head_dim, self.rope_base, x.device, x.dtype)

        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        n_rep = self.n_heads // self.n_kv_heads
        k = repeat_kv(k, n_rep)
        v = repeat_kv(v, n_rep)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        x = x + self.o_proj(attn)

        h = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x


class TinyLlama(nn.Module):
    """Embedding -> N LlamaBlocks -> RMSNorm -> lm_head (untied, no bias)."""

    def __init__(
        self,
        vocab: int = 256,
        dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        ffn_dim: int = 172,
        eps: float = 1e-6,
        max_seq: int = 2048,
    ) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            LlamaBlock(dim, n_heads, n_kv_heads, ffn_dim, max_seq=max_seq, eps=eps)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class KVCacheLlama(nn.Module):
    """Decode with a static KV cache (HF ``StaticCache`` style) around a :class:`TinyLlama`.

    ``forward(input_ids [B, T], cache_pos [T] int64) -> logits [B, T, vocab]`` writes the new keys
    and values into per-layer cache buffers ``[batch, H_kv, max_seq, head_dim]`` (B <= batch) in place
    and attends over the whole static cache under the mask ``key_pos <= cache_pos`` (shapes never
    change, so one compiled graph and one CUDA graph serve every step). The weights are the
    wrapped model's (shared, not copied); cache buffers live in the model's dtype.
    """

    def __init__(self, base: TinyLlama, batch: int = 1, max_seq: int | None = None) -> None:
        super().__init__()
        self.base = base
        first = base.layers[0]
        self.max_seq = max_seq or first.max_seq
        shape = (batch, first.n_kv_heads, self.max_seq, first.head_dim)
        for i in range(len(base.layers)):
            self.register_buffer(f"k_cache{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache{i}", torch.zeros(shape), persistent=False)
        cos, sin = rope_cos_sin(self.max_seq, first.head_dim, first.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset(self) -> None:
        for name, buf in self.named_buffers():
            if "_cache" in name:
                buf.zero_()

    def forward(self, input_ids: torch.Tensor, cache_pos: torch.Tensor) -> torch.Tensor:
        base = self.base
        b, t = input_ids.shape
        x = base.embed(input_ids)
        cos, sin = self.rope_cos[cache_pos].to(x.dtype), self.rope_sin[cache_pos].to(x.dtype)
        key_pos = torch.arange(self.max_seq, device=input_ids.device)
        mask = (key_pos[None, :] <= cache_pos[:, None])[None, None]  # [1, 1, T, max_seq]
        rows = torch.arange(b, device=input_ids.device)[:, None]
        for i, layer in enumerate(base.layers):
            hd, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
            h = layer.attn_norm(x)
            q = layer.q_proj(h).view(b, t, nh, hd).transpose(1, 2)
            k = layer.k_proj(h).view(b, t, nkv, hd).transpose(1, 2)
            v = layer.v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k_cache{i}"), getattr(self, f"v_cache{i}")
            # cache[b, :, pos] = new: one in-place index_put_ on the whole buffer, any batch <= the cache's
            k_cache[rows, :, cache_pos] = k.transpose(1, 2)
            v_cache[rows, :, cache_pos] = v.transpose(1, 2)
            keys, values = repeat_kv(k_cache[:b], nh // nkv), repeat_kv(v_cache[:b], nh // nkv)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + layer.o_proj(attn.transpose(1, 2).reshape(b, t, nh * hd))
            h = layer.mlp_norm(x)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        return base.lm_head(base.norm(x))


# ---- ViT -------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-norm ViT block: fused-qkv self-attention and a GELU MLP."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"dim {dim} not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        hidden = int(dim * mlp_ratio)

        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, the default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return x


class TinyViT(nn.Module):
    """Conv patch embedding + cls token + learned positions -> ViTBlocks ->
    LayerNorm -> linear head on the cls token."""

    def __init__(
        self,
        img_size: int = 32,
        patch: int = 8,
        in_chans: int = 3,
        dim: int = 64,
        depth: int = 2,
        n_heads: int = 4,
        n_classes: int = 10,
    ) -> None:
        super().__init__()
        if img_size % patch != 0:
            raise ValueError(f"img_size {img_size} not divisible by patch {patch}")
        n_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
        # Zero-initialised tokens would make every image's cls path identical;
        # small random values as in the reference ViT.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, n_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# ---- Small non-transformer models ------------------------------------------


class MLP(nn.Module):
    """Linear -> GELU -> Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int = 64, hidden: int = 128, out_dim: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU stages, global average pool, linear classifier."""

    def __init__(self, in_chans: int = 3, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.gap(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.flatten(x, 1))


# ---- Registry --------------------------------------------------------------

ExampleInputs = Callable[[int, "torch.device | str", torch.dtype], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class BuiltinModel:
    """A named model: ``factory(seed)`` builds it (float32, eval mode) and
    ``example_inputs(batch, device, dtype)`` builds matching inputs."""

    name: str
    description: str
    factory: Callable[..., nn.Module]
    example_inputs: ExampleInputs


def _seeded(build: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
    """Wrap a constructor so weights depend only on ``seed``. fork_rng keeps
    the caller's global RNG state untouched."""

    def factory(seed: int = 0) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        return model.float().eval()

    return factory


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()  # CPU generator: same values on every device
    gen.manual_seed(seed)
    return gen


def _float_input(*shape: int) -> ExampleInputs:
    def make(batch: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
        x = torch.randn(batch, *shape, generator=_generator(seed))
        return (x.to(device=device, dtype=dtype),)

    return make


def _token_input(seq_len: int, vocab: int) -> ExampleInputs:
    def make(batch: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
        # dtype is accepted for a uniform signature; ids are always int64.
        ids = torch.randint(0, vocab, (batch, seq_len), generator=_generator(seed))
        return (ids.to(device=device, dtype=torch.int64),)

    return make


def _decode_input(vocab: int, position: int) -> ExampleInputs:
    def make(batch: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocab, (batch, 1), generator=_generator(seed))
        return ids.to(device), torch.tensor([position], device=device)

    return make


_LLAMA_BLOCK_CFG: dict[str, int] = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 172}

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="vit",
            description="TinyViT: 32x32 RGB, patch 8, dim 64, depth 2, 4 heads, 10 classes",
            factory=_seeded(TinyViT),
            example_inputs=_float_input(3, 32, 32),
        ),
        BuiltinModel(
            name="llama",
            description="TinyLlama: vocab 256, dim 64, 2 layers, 4 heads / 2 kv, ffn 172, seq 16",
            factory=_seeded(TinyLlama),
            example_inputs=_token_input(seq_len=16, vocab=256),
        ),
        BuiltinModel(
            name="llama_decode",
            description="TinyLlama decode step, static KV cache (batch <= 4, max_seq 32): one token at position 5",
            factory=_seeded(lambda: KVCacheLlama(TinyLlama(), batch=4, max_seq=32)),
            example_inputs=_decode_input(vocab=256, position=5),
        ),
        BuiltinModel(
            name="mlp",
            description="MLP 64 -> 128 -> 128 -> 10 (GELU, ReLU)",
            factory=_seeded(MLP),
            example_inputs=_float_input(64),
        ),
        BuiltinModel(
            name="cnn",
            description="SmallCNN: 2x conv3x3-BN-ReLU, maxpool, global avgpool, linear; 3x32x32",
            factory=_seeded(SmallCNN),
            example_inputs=_float_input(3, 32, 32),
        ),
        BuiltinModel(
            name="vit_block",
            description="Single ViTBlock, dim 64, 4 heads, on [B, 17, 64]",
            factory=_seeded(lambda: ViTBlock(64, 4)),
            example_inputs=_float_input(17, 64),
        ),
        BuiltinModel(
            name="llama_block",
            description="Single LlamaBlock, dim 64, 4 heads / 2 kv, ffn 172, on [B, 16, 64]",
            factory=_seeded(lambda: LlamaBlock(**_LLAMA_BLOCK_CFG)),
            example_inputs=_float_input(16, 64),
        ),
    )
}


def get_builtin(name: str) -> BuiltinModel:
    """Look up a built-in model; unknown names raise KeyError listing the valid ones."""
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        valid = ", ".join(sorted(BUILTIN_MODELS))
        raise KeyError(f"unknown builtin model {name!r}; valid names: {valid}") from None


# ---- GPU benchmark configs -------------------------------------------------


def llama_decoder_853m() -> dict[str, Any]:
    """TinyLlama kwargs for a ~853M-parameter Llama decoder (GPU benchmarks).

    hidden 2048, 16 layers, 32 heads / 8 kv heads (head_dim 64), SwiGLU ffn
    5632, vocab 32000, untied embeddings:

    * per layer: q 4.19M + k 1.05M + v 1.05M + o 4.19M + MLP 34.60M
      + 2 norms 4K = 45,092,864
    * 16 layers = 721,485,824; embed + lm_head = 2 x 65,536,000; final norm 2,048
    * total = 852,559,872 parameters (~3.4 GB in float32, ~1.7 GB in bf16)

    Returns a config only, so nothing is allocated at import. Build with
    ``TinyLlama(**llama_decoder_853m())`` (ideally under ``torch.device("meta")``
    or directly on the GPU in bf16).
    """
    return {
        "vocab": 32000,
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "ffn_dim": 5632,
        "eps": 1e-6,
        "max_seq": 2048,
    }
