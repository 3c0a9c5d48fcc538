"""Launches per training step of the CUDA backend, counted on paper by the emulated backend.

Runs one forward + backward of a model built from fastconv layers on CPU tensors, with
torch.ops.fastconv routed to the emulated CUDA kernels (torch.ops.fastconv_emulated), and prints what
the emulated launcher counted: fastconv's own kernel launches, the GEMMs it hands to cuBLAS (through
ATen), and the workspace bytes it allocated. Beside them, the minimum: one kernel per op and pass
(conv forward; conv backward: one for grad_input when needed, one for grad_weight + grad_bias;
pool forward and backward). Bias adds and grad_bias sums (ATen elementwise/reduction kernels) are
not counted by the launcher; the script counts them with the profiler.

    python scripts/count_launches.py                       # MNIST CNN batch 100, AlexNet 224x224 batch 32
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fastconv  # noqa: E402
import fastconv._C_emulated  # noqa: E402,F401
from fastconv.models import build_model  # noqa: E402

E = torch.ops.fastconv_emulated
OPS = ("conv2d", "_conv2d_backward", "max_pool2d", "_max_pool2d_backward")


def count(name, batch, image, **kwargs):
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    x = torch.randn(batch, 1, image, image)
    y = torch.randint(0, 10, (batch,))
    lib = torch.library.Library("fastconv", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in OPS:
            lib.impl(op, getattr(E, op).default, "CPU")
    try:
        E._reset_counters()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
        launches, gemms, ws, peak = E._counters()
    finally:
        lib._destroy()
    # ATen kernels the fastconv ops call besides GEMMs: bias add and grad_bias sum (and copies)
    aten = 0
    for evt in prof.events():
        if evt.name in ("aten::add_", "aten::sum", "aten::copy_", "aten::zero_", "aten::fill_") and \
                any(p.name.startswith("fastconv_emulated::") for p in _parents(evt)):
            aten += 1
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    minimum = 2 * len(pools) + len(convs) + sum(1 if i == 0 else 2 for i in range(len(convs)))
    return dict(model=name, batch=batch, image=image, launches=launches, gemms=gemms, aten=aten,
                total=launches + gemms + aten, minimum=minimum, workspace_mib=ws / 2**20, peak_mib=peak / 2**20)


def _parents(evt):
    p = evt.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alexnet-size", type=int, default=224)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [count("mnist_cnn", 100, 28), count("alexnet", 32, 28, resize=args.alexnet_size)]
    print("| model | batch | fastconv kernels | GEMMs | other ATen kernels | total | minimum | workspace allocated (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['launches']} | {r['gemms']} | {r['aten']} | {r['total']} | "
              f"{r['minimum']} | {r['workspace_mib']:.1f} (largest {r['peak_mib']:.1f}) |")


if __name__ == "__main__":
    main()
