import sys, os, subprocess
V = {"A": [], "B": [("zn = z_s.index(s).slice(0, BG, dim=1).load(SL)", "zn = gl.full([BN, BG], 8, gl.int32, SL)")],
     "C": [("s3 = s_s.index(s).load(SL).to(gl.float32)[:, :, None]", "s3 = gl.full([BN, BG, 1], 1.0, gl.float32, L3)")]}
V["D"] = V["B"] + V["C"]
if len(sys.argv) == 1:
    for v in V:
        r = subprocess.run([sys.executable, __file__, v], capture_output=True, text=True)
        print(v, r.returncode, (r.stdout + r.stderr)[-600:].replace("\n", " | "), flush=True)
    sys.exit()
import torch
from fxforge.runtime import quant_gemv_gluon as qgv, quant_linear as ql
from fxforge.runtime.kernels import load_kernel
from fxforge.config import cache_dir
from fxforge.passes.quant.formats import quantize, dequantize
src = qgv.GEMV_GLUON_TEMPLATE.read_text()
for a, b in V[sys.argv[1]]:
    assert a in src; src = src.replace(a, b)
k = load_kernel("dequant_gemv_gluon", src, "cuda", cache_dir())
qgv.kernels_for = lambda dt: {"dequant_gemv_gluon": k}
N = K = 4096
q = quantize(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), "w4a16_g128")
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
out = torch.empty(1, N, device="cuda", dtype=torch.bfloat16)
kf = ql.kernel_format("w4a16_g128")
for wait in (False, True):
    qgv.launch(x, q.codes, q.scales, q.zeros, None, out, kf, {"BLOCK_N": 16, "BG": 8, "STAGES": 4, "num_warps": 4},
               lambda p, kb, st: ql._plan_splits(1, p, kb, st, out), pdl=True, wait=wait)
    torch.cuda.synchronize()
    ref = x.double() @ dequantize(q).double().t()
    print("wait", wait, "err", ((out.double() - ref).norm() / ref.norm()).item())
