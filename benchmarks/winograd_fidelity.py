"""Winograd fidelity on a trained CNN (issue 5): fp16 / bf16 accuracy with standard vs searched
F(m,3) points against fp32 direct convolution, emulated on the CPU.

Data: (1) scikit-learn's bundled 8x8 digits (1797 images, shipped in the wheel), upsampled to
32x32 so that F(8,3) tiles fit every layer (32, 16 and 8 pixel maps); stratified 1437 / 360 split,
seed 0. Easy: large margins, so accuracy moves only when a transform is badly broken.
(2) Fashion-MNIST 28x28 from the Debian package dataset-fashion-mnist (60k train; the first 5000
of the 10k test images), a harder task (~90%) whose accuracy reacts to smaller logit errors;
skipped if /usr/share/datasets/fashion-mnist is absent (apt-get install dataset-fashion-mnist).
Model: 6 x (conv3x3 pad 1 + BN + ReLU), channels 16-16-pool-32-32-pool-64-64, global average
pool, linear; trained in fp32 (AdamW, OneCycle, random shifts), then BN folded into the convs.
Inference variants: fp32 direct (reference); low-precision direct; low-precision Winograd on all
six 3x3 convs with the standard integer points, the library's error-optimal points, and the
library's kappa-optimal points. In a low-precision variant every activation, weight and constant is
rounded to the dtype (emulate.py "stage" model; "tc" rows use the tensor-core model); ReLU and
max-pool are exact in any format. Nothing is pickled; `--save-dir` writes safetensors.

    python benchmarks/winograd_fidelity.py [--workloads digits,fashion] [--save-dir DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import Results, out_dirs  # noqa: E402

from fxforge.passes.winograd import library  # noqa: E402
from fxforge.passes.winograd.conv import direct_conv2d, rounder, winograd_conv2d  # noqa: E402

CHANNELS = (16, 16, "M", 32, 32, "M", 64, 64)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for v in CHANNELS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def load_data(size: int = 32, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    X = F.interpolate(X, size=(size, size), mode="bilinear", align_corners=False)
    X = (X - X.mean()) / X.std()
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=360, random_state=seed, stratify=y)
    y = torch.tensor(y)
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_fashion(n_test: int = 5000):
    import gzip

    def read(name, offset):
        return np.frombuffer(gzip.open(FASHION / name).read(), np.uint8, offset=offset)

    Xtr = torch.tensor(read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28), dtype=torch.float32) / 255.0
    Xte = torch.tensor(read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28)[:n_test], dtype=torch.float32) / 255.0
    ytr = torch.tensor(read("train-labels-idx1-ubyte.gz", 8).astype(np.int64))
    yte = torch.tensor(read("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64)[:n_test])
    mu, sd = Xtr.mean(), Xtr.std()
    return (Xtr - mu) / sd, ytr, (Xte - mu) / sd, yte


# name -> (loader, epochs, low-precision models to run for fp16)
WORKLOADS = {
    "digits32_cnn6": (load_data, 30, ("stage", "tc")),
    "fashion28_cnn6": (load_fashion, 4, ("stage",)),
}


def train(Xtr, ytr, epochs: int, seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * ((len(Xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), 64):
            b = perm[i:i + 64]
            x = Xtr[b]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()    # random shift augmentation
            x = torch.roll(x, (dx, dy), (2, 3))
            loss = F.cross_entropy(model(x), ytr[b], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fold(model: CNN):
    """[(weight, bias)] per conv with BN folded in (inference form), and the head."""
    convs, mods = [], list(model.features)
    for i, mod in enumerate(mods):
        if isinstance(mod, nn.Conv2d):
            bn = mods[i + 1]
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            convs.append(((mod.weight * s.view(-1, 1, 1, 1)).detach(), (bn.bias - bn.running_mean * s).detach()))
    return convs, (model.head.weight.detach(), model.head.bias.detach())


def infer(X, convs, head, conv_fn, dtype=None):
    """Run the folded network with `conv_fn(x, w, b)`; every activation rounded to `dtype`."""
    rd = rounder(dtype)
    x = rd(X)
    ci = 0
    for v in CHANNELS:
        if v == "M":
            x = F.max_pool2d(x, 2)
        else:
            w, b = convs[ci]
            ci += 1
            x = torch.relu(conv_fn(x, w, b))
    x = rd(x.mean((2, 3)))
    W, b = head
    return rd(rd(x @ rd(W).T) + rd(b))


def evaluate(res: Results, W: str, model: CNN, Xte, yte, fp16_models) -> None:
    convs, head = fold(model)
    with torch.no_grad():
        ref = infer(Xte, convs, head, lambda x, w, b: F.conv2d(x, w, b, padding=1))
        ref_pred = ref.argmax(1)

        def record(impl, logits):
            ok = torch.isfinite(logits).all(1)
            pred = torch.where(ok, logits.argmax(1), torch.full_like(yte, -1))
            res.add(W, impl, "top1", 100.0 * (pred == yte).float().mean().item(), "%")
            res.add(W, impl, "agree_fp32", 100.0 * (pred == ref_pred).float().mean().item(), "%")
            err = ((logits - ref).norm() / ref.norm()).item() if ok.all() else float("inf")
            res.add(W, impl, "logit_rel_err", err, "rel_err")
            res.add(W, impl, "nonfinite_images", float((~ok).sum().item()), "count")

        record("fp32_direct", ref)
        for dtype in ("fp16", "bf16"):
            record(f"{dtype}_direct", infer(Xte, convs, head, lambda x, w, b: direct_conv2d(x, w, b, 1, dtype), dtype))
            for m in (4, 6, 8):
                sets = {"standard": library.standard(m, 3), "found": library.found(m, 3, "error", dtype),
                        "found_cond": library.found(m, 3, "cond", None)}
                for name, entry in sets.items():
                    t = entry.transform()
                    for model_name in (fp16_models if dtype == "fp16" else ("stage",)):
                        fn = lambda x, w, b, t=t, mo=model_name: winograd_conv2d(x, w, t, b, 1, dtype, mo)
                        suffix = "" if model_name == "stage" else "_tc"
                        record(f"{dtype}_F{m}_{name}{suffix}", infer(Xte, convs, head, fn, dtype))


def summary(rows) -> list[str]:
    """Markdown pivot: one line per variant, top-1 / logit error per workload."""
    works = list(dict.fromkeys(r["workload"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"] != "fp32_train"))
    val = {(r["workload"], r["impl"], r["metric"]): r["value"] for r in rows}
    head = "| variant | " + " | ".join(f"{w} top1 % | {w} logit rel err" for w in works) + " |"
    out = ["## Summary", "", head, "|---|" + "---|---|" * len(works)]
    for i in impls:
        cells = []
        for w in works:
            t, e = val.get((w, i, "top1")), val.get((w, i, "logit_rel_err"))
            cells += ["-" if t is None else f"{t:.2f}", "-" if e is None else f"{e:.3g}"]
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="digits,fashion", help="comma list: digits, fashion")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-dir", default=None, help="write the trained fp32 weights as safetensors here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = Results("winograd_fidelity")
    wanted = [w for w in WORKLOADS if w.split("_")[0].rstrip("0123456789") in a.workloads.split(",")]
    for W in wanted:
        loader, epochs, fp16_models = WORKLOADS[W]
        if W.startswith("fashion") and not FASHION.exists():
            print(f"skipping {W}: {FASHION} not found (apt-get install dataset-fashion-mnist)")
            continue
        Xtr, ytr, Xte, yte = loader()
        t0 = time.perf_counter()
        model = train(Xtr, ytr, epochs)
        res.add(W, "fp32_train", "train_time", time.perf_counter() - t0, "s")
        res.add(W, "fp32_train", "epochs", float(epochs), "count")
        if a.save_dir:
            from safetensors.torch import save_file

            Path(a.save_dir).mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(a.save_dir) / f"{W}.safetensors"))
        evaluate(res, W, model, Xte, yte, fp16_models)
    notes = [""] + summary(res.rows) + ["## Setup", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             "Point sets (from `pointsets.json`): " + "; ".join(
                 f"F({m},3) {n}: {{{', '.join(library.standard(m).points if n == 'standard' else (library.found(m, 3, 'error', 'fp16') if n == 'found' else library.found(m, 3, 'cond', None)).points)}}}"
                 for m in (4, 6, 8) for n in ("standard", "found", "found_cond")),
             "", "`found` = the library's fp16 (bf16 rows: bf16) error-optimal set; `found_cond` = its kappa-optimal "
             "(NOVA-objective) set; `_tc` = tensor-core precision model. top1 counts an image with non-finite logits as "
             "wrong. digits: 360 test images (one image = 0.28 points); fashion: 5000 (0.02 points)."]
    res.write(out_dirs(), notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
