"""Run a Program: bind shape symbols, allocate from the static memory plan, launch kernels, call
ATen for views and fallbacks, free buffers after their last use.

Per input-shape signature the executor caches a *launch plan* (evaluated sizes, grids, launch
kwargs, allocation shapes) so a repeated call does no sympy work.
"""
from __future__ import annotations

import functools
import operator

import sympy
import torch
from fxforge.errors import FxforgeError, SignatureMismatch

from .kernels import (
    INT32_MAX,
    cuda_capability,
    cuda_sm_count,
    device_index,
    launch_config,
    load_kernel,
    max_offset,
    pdl_capable,
)
from .memory import _ITEMSIZE, step_reads, step_writes
from .program import AtenStep, KernelStep, Program

_DTYPES = {k: getattr(torch, k) for k in _ITEMSIZE}


@functools.lru_cache(maxsize=4096)
def _compile_expr(expr: str):
    e = sympy.sympify(expr)
    syms = sorted(e.free_symbols, key=str)
    f = sympy.lambdify(syms, e, modules=[{"floor": lambda x: int(x // 1), "ceiling": lambda x: -int(-x // 1)}, "math"])
    return [str(s) for s in syms], f


def evaluate(x, env: dict):
    if isinstance(x, (int, float)):
        return x
    names, f = _compile_expr(x)
    v = f(*(env[n] for n in names))
    return int(v) if float(v).is_integer() else v


def grid_numel(st, scalars) -> int:
    """Elements a pointwise/reduction launch indexes (xnumel·rnumel); 0 for other kinds."""
    if st.kind == "pointwise":
        return scalars[len(st.sizes)]
    if st.kind == "reduction":
        return scalars[len(st.sizes)] * scalars[len(st.sizes) + 1]
    return 0


def _shape(xs, syms) -> tuple:
    return tuple(evaluate(s, syms) for s in xs)


def storage_elements(shape, stride) -> int:
    """Elements a strided tensor spans in its storage."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def resolve_op(name: str):
    if name == "getitem":
        return operator.getitem
    opname, overload = name.split("::", 1)[1].rsplit(".", 1) if "::" in name else (None, None)
    packet = getattr(getattr(torch.ops, name.split("::")[0]), opname)
    return getattr(packet, overload)


_CONSTANT_TAGS = {
    "dtype": lambda v: _DTYPES[v] if v in _DTYPES else getattr(torch, v),
    "device": torch.device,
    "layout": lambda v: getattr(torch, v),
    "memory_format": lambda v: getattr(torch, v),
}


def compile_template(t):
    """A JSON argument template (see program.py) as a function ``(env, syms) -> value``, built once
    per step so a call does no template walking; constant subtrees are evaluated here."""
    const, value = _compile(t)
    return (lambda env, syms: value) if const else value


def _compile(t):
    """(True, constant) or (False, getter)."""
    if isinstance(t, list):
        parts = [_compile(i) for i in t]
        if all(c for c, _ in parts):
            return True, [v for _, v in parts]
        getters = [(lambda env, syms, v=v: v) if c else v for c, v in parts]
        return False, lambda env, syms: [g(env, syms) for g in getters]
    if isinstance(t, dict):
        if "buf" in t:
            name = t["buf"]
            return False, lambda env, syms: env[name]
        if "sym" in t:
            expr = t["sym"]
            return False, lambda env, syms: evaluate(expr, syms)
        for tag, make in _CONSTANT_TAGS.items():
            if tag in t:
                return True, make(t[tag])
        items = t.get("dict", t)
        parts = {k: _compile(v) for k, v in items.items()}
        if all(c for c, _ in parts.values()):
            return True, {k: v for k, (_, v) in parts.items()}
        return False, lambda env, syms: {k: (v if c else v(env, syms)) for k, (c, v) in parts.items()}
    return True, t


def _index_put_(*args, **kwargs):
    from .scatter import index_put_

    return index_put_(*args, **kwargs)


# ATen ops a program runs through fxforge's own kernels (same signature, same semantics).
RUNTIME_KERNELS = {"aten::index_put_.default": _index_put_}
DECODE_MAX_LQ = 16  # attention with at most this many query rows also tries the split-KV decode kernel


def _capability(device: torch.device) -> tuple:
    return cuda_capability(device_index(device))


def _sm_count(device: torch.device) -> int:
    return cuda_sm_count(device_index(device))


class Executor:
    def __init__(self, program: Program, constants: dict, cache_dir: str, config_id: str = "", strict_signature: bool = True,
                 autotune: str = "fast", report=None, cuda_graphs: str = "auto"):
        self.program = program
        self.cuda_graphs = cuda_graphs
        self._graph = None
        self._graph_reason = None
        self.autotune = autotune
        self.report = report  # CompileReport: autotune winners are appended to report.autotune
        self._tuner = None
        self.constants = constants
        self.cache_dir = cache_dir
        self.config_id = config_id
        self.strict_signature = strict_signature
        self._kernels: dict = {}
        self._plans: dict = {}
        self._choices: dict = {}  # (step index, shape key) -> winning variant
        self.force_tma = None  # tests/probes: a TMA config tuple runs every matmul it can through the TMA twin
        self._tma_note = None
        self._ops = {}
        # After step i, drop these buffers (their last reader ran).
        last: dict[str, int] = {}
        for i, st in enumerate(program.steps):
            for b in step_reads(st) + step_writes(st):
                last[b] = i
        from .memory import buffer_refs
        keep = set(buffer_refs(program.outputs)) | set(program.constants)
        self._free_after = [[] for _ in program.steps]
        for b, i in last.items():
            if b not in keep:
                self._free_after[i].append(b)
        # Each ATen step as one closure over its resolved op and compiled argument getters.
        self._aten_calls = {}
        for i, st in enumerate(program.steps):
            if isinstance(st, AtenStep):
                op = self._ops.setdefault(st.op, RUNTIME_KERNELS.get(st.op) or resolve_op(st.op))
                args = compile_template(st.args)
                kwargs = {k: compile_template(v) for k, v in st.kwargs.items()}
                self._aten_calls[i] = (lambda env, syms, op=op, args=args, kwargs=kwargs:
                                       op(*args(env, syms), **{k: g(env, syms) for k, g in kwargs.items()}))
        outputs = compile_template(program.outputs)
        self._outputs = lambda env, syms: list(outputs(env, syms))  # a fresh list per call

    # ---- signature -----------------------------------------------------------------------------
    def expected_signature(self) -> str:
        parts = []
        for i in self.program.inputs:
            parts.append(f"{i['name']}: {i['sig'].dtype}{list(i['sig'].shape)} on {i['sig'].device}" if i["sig"] else f"{i['name']}: int")
        return "(" + ", ".join(parts) + ")"

    @staticmethod
    def given_signature(args) -> str:
        return "(" + ", ".join(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)} on {a.device}" if isinstance(a, torch.Tensor) else repr(a) for a in args) + ")"

    def bind(self, args) -> dict:
        prog = self.program
        if len(args) != len(prog.inputs):
            self._mismatch(args, f"expected {len(prog.inputs)} inputs, got {len(args)}")
        syms: dict[str, int] = {}
        for name, (idx, dim) in prog.symbols.items():
            a = args[idx]
            syms[name] = int(a) if dim < 0 else int(a.shape[dim])
        for i, (spec, a) in enumerate(zip(prog.inputs, args)):
            if spec["kind"] != "tensor":
                continue
            sig = spec["sig"]
            if not isinstance(a, torch.Tensor):
                self._mismatch(args, f"input {i} ({spec['name']}) must be a tensor")
            if str(a.dtype).replace("torch.", "") != sig.dtype:
                self._mismatch(args, f"input {i} ({spec['name']}) has dtype {a.dtype}, expected {sig.dtype}")
            if a.device.type != torch.device(sig.device).type:
                self._mismatch(args, f"input {i} ({spec['name']}) is on {a.device}, expected {sig.device}")
            if a.dim() != len(sig.shape) or any(evaluate(s, syms) != d for s, d in zip(sig.shape, a.shape)):
                self._mismatch(args, f"input {i} ({spec['name']}) has shape {list(a.shape)}, expected {sig.shape}")
        return syms

    def _mismatch(self, args, why: str):
        raise SignatureMismatch(f"{why}. Compiled for {self.expected_signature()}, called with {self.given_signature(args)}")

    # ---- launch plan ---------------------------------------------------------------------------
    def _kernel(self, name: str, device_type: str):
        key = (name, device_type)
        if key not in self._kernels:
            k = self.program.kernels[name]
            self._kernels[key] = load_kernel(k["entry"], k["source"], device_type, self.cache_dir, self.config_id)
        return self._kernels[key]

    def _plan(self, syms: dict, device: torch.device):
        key = (tuple(sorted(syms.items())), str(device))
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        interp = device.type == "cpu"
        steps = []
        for st in self.program.steps:
            if isinstance(st, KernelStep):
                launch = {k: evaluate(v, syms) for k, v in st.launch.items() if k in ("xnumel", "rnumel", "M", "N", "K", "batch")}
                grid, kw = launch_config(st.kind, launch, interp) if st.kind != "attention" else (None, {})
                sizes = [evaluate(s, syms) for s in st.sizes]
                scalars = sizes + ([launch["xnumel"]] + ([launch["rnumel"]] if "rnumel" in launch else []) if "xnumel" in launch else [])
                if st.kind == "matmul":
                    scalars = [launch["M"], launch["N"], launch["K"]] + sizes
                elif st.kind == "attention":
                    scalars = []
                allocs = [(b, _shape(sig.shape, syms), _shape(sig.stride, syms) if sig.stride is not None else None, _DTYPES[sig.dtype])
                          for b, sig in st.outputs.items()]
                empty = (launch.get("xnumel", 1) == 0) or (st.kind == "matmul" and launch["M"] * launch["N"] * launch["batch"] == 0)
                kern = self._kernel(st.kernel, device.type)
                if st.kind in ("pointwise", "reduction") and "PDL_SIGNAL" in getattr(kern, "arg_names", ()) and \
                        pdl_capable(device):
                    # griddepcontrol.launch_dependents at the kernel's start: a quantized GEMV after it (launched with
                    # PDL) fetches its first code words while this kernel runs (older artifacts lack the parameter)
                    kw = dict(kw, PDL_SIGNAL=True)
                steps.append((kern, grid, kw, scalars, allocs, empty))
            else:
                steps.append(None)
        pool = self._pool(syms, device)
        plan = (steps, pool)
        self._plans[key] = plan
        return plan

    def _pool(self, syms: dict, device: torch.device):
        mem = self.program.memory
        if not mem.slots:
            return None
        slots = [torch.empty(evaluate(s, syms), dtype=torch.uint8, device=device) for s in mem.slots]
        views = {}
        for st in self.program.steps:
            if isinstance(st, KernelStep):
                for b, sig in st.outputs.items():
                    if b in mem.assignment:
                        shape = _shape(sig.shape, syms)
                        dt = _DTYPES[sig.dtype]
                        stride = _shape(sig.stride, syms) if sig.stride is not None else torch.empty(shape, device="meta").stride()
                        n = storage_elements(shape, stride)
                        views[b] = slots[mem.assignment[b]][: n * dt.itemsize].view(dt).as_strided(shape, stride)
        return views

    @staticmethod
    def _too_big(st):
        raise FxforgeError(f"{st.kind} kernel {st.kernel}: a tensor spans more than 2**31 elements, past the "
                           "32-bit index math of this template; compile with FXFORGE_MATMUL=0 or split the input")

    def _run_attention(self, i, st, kern, env, device):
        """The attention template, or eager SDPA where autotuning measured it faster on this GPU."""
        from .attention import launch

        q, k, v = (env[o.buf] for o in st.loads[:3])
        mask = env[st.loads[3].buf] if st.launch.get("has_mask") else None
        out = env[st.stores[0].buf]
        scale, causal = st.launch["scale"], st.launch["causal"]
        from .attention import block_configs

        variants = {}
        if not causal and q.shape[2] <= DECODE_MAX_LQ:
            # Decode-sized (few query rows, a long cache): the split-KV kernel, tried first.
            from . import decode_attention as dec

            k1, k2 = dec._kernels(device.type, self.cache_dir)
            dcfgs = dec.decode_configs(q.shape[2], q.shape[1], k.shape[1], q.shape[3], device.type == "cpu", k.element_size())
            for cfg in dcfgs if self.autotune == "max" else dcfgs[:1]:
                name = "decode_{BLOCK_N}".format(**cfg) + (f"_w{cfg['num_warps']}s{cfg['num_stages']}" if "num_warps" in cfg else "")
                variants[name] = (lambda cfg=cfg: dec.launch(k1, k2, q, k, v, mask, out, scale, blocks=cfg))
        configs = block_configs(q.shape[2], q.shape[3], device.type == "cpu", q.element_size())
        for cfg in configs if self.autotune == "max" else configs[:1]:
            name = "triton_{BLOCK_M}x{BLOCK_N}".format(**cfg) + (f"_w{cfg['num_warps']}s{cfg['num_stages']}" if "num_warps" in cfg else "")
            # template options are part of the name, so configs differing only in them stay distinct
            name += (f"_tma{cfg['TMA']}" if cfg.get("TMA") else "") + "".join(
                f"_{opt.lower()}{'' if cfg[opt] is True or cfg[opt] == 1 else cfg[opt]}"
                for opt in ("LPT", "WS", "PIPE") if cfg.get(opt))
            variants[name] = (lambda cfg=cfg: launch(kern, q, k, v, mask, out, scale, causal, blocks=cfg))
        if device.type == "cuda":
            def sdpa():
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
                env[st.stores[0].buf] = o  # the result replaces the planned buffer for later readers
            variants["sdpa"] = sdpa
        self._choose(i, st, variants, device, f"attention|{list(q.shape)}x{list(k.shape)}|{q.dtype}|{causal}|{mask is not None}",
                     [*q.shape, k.shape[1], k.shape[2]])()

    def _choose(self, i, st, variants: dict, device, key: str, shape: list, note: str | None = None):
        """The winning variant for step i: measured once per key (and cached on disk) on CUDA."""
        choice = self._choices.get((i, key))
        if choice is None:
            if device.type != "cuda" or self.autotune in ("off", False) or len(variants) == 1:
                choice = next(iter(variants))
            else:
                from .autotune import AutotuneCache, tune

                if self._tuner is None:
                    self._tuner = AutotuneCache(self.cache_dir, device)
                choice, info = tune(self._tuner, f"{st.kernel}|{key}", variants)
                if self.report is not None:
                    self.report.autotune.append({"kernel": st.kernel, "shape": shape, "winner": choice,
                                                 "ms": {k: round(v, 4) for k, v in info["ms"].items()}, **({"note": note} if note else {})})
            self._choices[(i, key)] = choice
        return variants[choice]

    # ---- matmul variants -------------------------------------------------------------------------
    def _matmul_variants(self, st, entry, env, ptrs, scalars, strides, device) -> dict:
        """name -> zero-arg launcher: each Triton config, and cuBLAS (+ a fused-epilogue launch)."""
        from .autotune import EPILOGUE_CONFIG, candidate_configs

        kern, grid, _kw, _, _, _ = entry
        M, N, K = scalars[0], scalars[1], scalars[2]
        B = grid[1]
        launch = st.launch
        dummy = ptrs[0]

        def triton_launch(cfg, external=None):
            bm, bn, bk, w, stages, gemv = cfg
            g = (((M + bm - 1) // bm) * ((N + bn - 1) // bn), B)
            acc = (external, external.stride(0) if external.dim() == 3 else 0, external.stride(-2), external.stride(-1)) if external is not None else (dummy, 0, 0, 0)
            kern[g](*ptrs, *scalars, *strides, *acc, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                    EXTERNAL_ACC=external is not None, GEMV=gemv and external is None, EVEN_K=gemv and K % bk == 0,
                    INTERPRETED=False, num_warps=w, num_stages=stages)

        def cublas():
            a, b = env[st.loads[0].buf], env[st.loads[1].buf]
            direct = launch.get("direct")
            out = env[st.stores[0].buf]
            if direct is not None and out.is_contiguous():
                view = out.view(B, M, N) if direct["op"] == "bmm" else out.view(M, N)
                if direct["op"] == "addmm":
                    torch.addmm(env[st.loads[2].buf], a, b, beta=direct["beta"], alpha=direct["alpha"], out=view)
                else:
                    (torch.bmm if direct["op"] == "bmm" else torch.mm)(a, b, out=view)
                return
            c = torch.bmm(a, b) if launch.get("op") == "bmm" else torch.mm(a, b)
            triton_launch(EPILOGUE_CONFIG, external=c)

        configs = candidate_configs(M, N, K)
        tma = self._tma_variants(st, env, ptrs, scalars, strides, device)
        if self.autotune != "max":
            # "fast": one Triton compile per kernel keeps cold compiles short; where the TMA twin
            # is offered (sm_90+) it replaces the regular kernel's tile configs
            # is offered (sm_90+) it replaces the regular kernel's tile configs, and a bare matmul
            # that could have had it (no refusal: fast mode offers none there) is cuBLAS's alone
            bare_on_hopper = not tma and self._tma_note is None and not configs[0][5]
            configs = [] if bare_on_hopper else configs[:1] if not tma or configs[0][5] else []
        variants = {("gemv_" if c[5] else "triton_") + "x".join(map(str, c[:5])): (lambda c=c: triton_launch(c)) for c in configs}
        variants.update(tma)
        variants["cublas"] = cublas
        return variants

    def _tma_variants(self, st, env, ptrs, scalars, strides, device) -> dict:
        """The TMA twin's configs (codegen/emit_matmul_tma.py) where the GPU and operands allow it;
        otherwise {} and the reason is kept for the autotune report."""
        from .autotune import TMA_MIN_CC, tma_configs, tma_launch, tma_name, tma_refusal

        a, b = env[st.loads[0].buf], env[st.loads[1].buf]
        M, N, K = scalars[:3]
        why = "no TMA twin emitted (bmm or M <= 4)" if not st.launch.get("tma") else None
        if why is None and self.autotune in ("off", False):  # untuned: the regular kernel, as before
            why = "autotune off"
        if why is None and _capability(device)[0] < TMA_MIN_CC:
            why = "GPU below sm_90"
        why = why or tma_refusal(a, b, 1, M)
        self._tma_note = why
        if why is not None:
            return {}
        kern = self._kernel_entry(st.kernel, "_tma", device.type)
        sms = _sm_count(device)
        cfgs = tma_configs(M, N, K, self.autotune != "max", epilogue=st.launch.get("direct") is None)
        out = env[st.stores[0].buf]  # a tma_store config stores this (the first output) through a descriptor
        return {tma_name(c): (lambda c=c: tma_launch(kern, a, b, ptrs, scalars, strides, c, sms, out=out,
                                                            tile_loads=st.launch.get("tma_tile_loads", ()))) for c in cfgs}

    def _kernel_entry(self, name: str, suffix: str, device_type: str):
        """Another ``@triton.jit`` function of a kernel's source (e.g. the matmul's ``_tma`` twin)."""
        key = (name + suffix, device_type)
        if key not in self._kernels:
            k = self.program.kernels[name]
            self._kernels[key] = load_kernel(k["entry"] + suffix, k["source"], device_type, self.cache_dir, self.config_id)
        return self._kernels[key]

    def _run_matmul(self, i, st, entry, env, ptrs, scalars, strides, device):
        kern, grid, kw, _, _, _ = entry
        if self.force_tma is not None and st.launch.get("tma"):  # tests/probes: the TMA twin where allowed
            from .autotune import tma_launch, tma_refusal

            a, b = env[st.loads[0].buf], env[st.loads[1].buf]
            if tma_refusal(a, b, 1, scalars[0], dtypes=(a.dtype,)) is None:
                cpu = device.type == "cpu"
                tma_launch(self._kernel_entry(st.kernel, "_tma", device.type), a, b, ptrs, scalars, strides,
                           self.force_tma, num_sms=3 if cpu else _sm_count(device), interpreted=cpu,
                           out=env[st.stores[0].buf], tile_loads=st.launch.get("tma_tile_loads", ()))
                return
        if device.type != "cuda":
            kern[grid](*ptrs, *scalars, *strides, ptrs[0], 0, 0, 0, **kw)
            return
        M, N, K = scalars[:3]
        variants = self._matmul_variants(st, entry, env, ptrs, scalars, strides, device)
        key = f"{M}x{N}x{K}x{grid[1]}|{[str(env[o.buf].dtype) for o in st.loads[:2]]}"
        self._choose(i, st, variants, device, key, [grid[1], M, N, K], note=self._tma_note and f"tma not offered: {self._tma_note}")()

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _use_graph(self, args) -> bool:
        if self.cuda_graphs == "off" or self.program.symbols or self._graph_reason is not None:
            return False
        return any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)

    def _graph_call(self, args):
        """Static shapes on CUDA: capture the whole step list once, then copy inputs and replay.
        Launch overhead (Python + driver, per kernel and per fallback) disappears; outputs are
        cloned out of the graph's static buffers so a later replay cannot overwrite them."""
        self.bind(args)
        if self._graph is None:
            out = self._run(args)  # first call: autotuning and Triton compilation happen here
            # The warm-up run below updates state (a KV cache) again: keep this call's state.
            state = [(self.constants[n], self.constants[n].clone()) for n in self.program.mutations]
            try:
                static_in = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._run(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._run(static_in)
                self._graph = (graph, static_in, static_out)
                self._set_graph_status("captured")
            except Exception as e:  # noqa: BLE001 — e.g. an op that synchronizes: run without graphs
                self._graph_reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                self._set_graph_status(f"disabled: {self._graph_reason}")
                torch.cuda.synchronize()
            for buf, saved in state:
                buf.copy_(saved)
            return out
        graph, static_in, static_out = self._graph
        for dst, src in zip(static_in, args):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return [o.clone() if isinstance(o, torch.Tensor) else o for o in static_out]

    def _set_graph_status(self, status: str):
        if self.report is not None:
            self.report.cuda_graph = status

    # ---- run -----------------------------------------------------------------------------------
    def __call__(self, *args):
        if self._use_graph(args):
            return self._graph_call(args)
        return self._run(args)

    def _run(self, args):
        prog = self.program
        syms = self.bind(args)
        device = torch.device(prog.device) if prog.device != "cpu" else next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        plan_steps, pool = self._plan(syms, device)
        env = dict(self.constants)
        for spec, a in zip(prog.inputs, args):
            env[spec["name"]] = a
        for i, st in enumerate(prog.steps):
            if isinstance(st, KernelStep):
                kern, grid, kw, scalars, allocs, empty = plan_steps[i]
                for b, shape, stride, dt in allocs:
                    if pool is not None and b in pool:
                        env[b] = pool[b]
                    elif stride is None:
                        env[b] = torch.empty(shape, dtype=dt, device=device)
                    else:
                        env[b] = torch.empty_strided(shape, stride, dtype=dt, device=device)
                if not empty:
                    ptrs, strides = [], []
                    for op in st.loads + st.stores:
                        t = env[op.buf]
                        ptrs.append(t)
                        shp, std = t.shape, t.stride()
                        strides += [0 if d < 0 or shp[d] == 1 else std[d] for d in op.tdims]
                    big = grid_numel(st, scalars) > INT32_MAX or any(
                        t.untyped_storage().nbytes() > INT32_MAX * t.element_size() and max_offset(t) > INT32_MAX for t in ptrs)
                    if big and st.kind in ("pointwise", "reduction"):
                        kw = dict(kw, INDEX64=True)
                    elif big:
                        self._too_big(st)
                    if st.kind == "matmul":
                        self._run_matmul(i, st, plan_steps[i], env, ptrs, scalars, strides, device)
                    elif st.kind == "attention":
                        self._run_attention(i, st, kern, env, device)
                    else:
                        kern[grid](*ptrs, *scalars, *strides, **kw)
            else:
                env[st.outputs[0]] = self._aten_calls[i](env, syms)
            for b in self._free_after[i]:
                env.pop(b, None)
        outs = self._outputs(env, syms)
        if not prog.mutations:
            return outs
        for name, new in zip(prog.mutations, outs):  # state write-back (a no-op where done in place)
            state = self.constants[name]
            if new is not state and not (new.data_ptr() == state.data_ptr() and new.stride() == state.stride()):
                state.copy_(new)
        return outs[len(prog.mutations):]
