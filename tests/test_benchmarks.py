"""The benchmark scripts run end to end on tiny sizes and write a JSON with every expected row.

Nothing here asserts on time: only that the scripts run, check correctness (they exit non-zero on a
mismatch) and report every row. Each script runs in a subprocess, so its global settings (threads,
TF32, cuDNN flags) do not leak into other tests.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import fastconv  # noqa: E402,F401  (the benchmarks need the built extension: no skipping)
import bench_ops  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CORE_CONV_LAYERS = ["mnist_cnn.conv1", "mnist_cnn.conv2", "lenet.conv2", "simple_convnet.conv1", "alexnet.conv1"]
CORE_POOL_LAYERS = ["mnist_cnn.pool1", "alexnet.pool1"]


def run_script(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def check_ops_json(path, suite, tiny, peers):
    with open(path) as f:
        res = json.load(f)
    assert res["benchmark"] == "bench_ops"
    assert res["failures"] == []
    assert res["fastconv"]["available"] and not res["fastconv"]["standin"]
    for key in ("device_name", "torch", "git_commit", "threads", "cudnn", "cuda"):
        assert key in res["env"]
    assert res["settings"]["suite"] == suite and res["settings"]["tf32"] is False
    expected = [r.id for r in bench_ops.build_rows(suite, tiny)]
    got = [r["id"] for r in res["rows"]]
    assert got == expected
    for r in res["rows"]:
        assert r["check"]["ok"], r
        want = {"fastconv", "torch"} | ({"numpy"} if "numpy" in peers and r["op"] == "conv2d" else set())
        want |= {p for p in peers if p.startswith("torch-") and r["op"] == "conv2d"}
        assert set(r["times"]) == want, (r["id"], r["times"].keys(), r["errors"])
        for t in r["times"].values():
            assert t["median"] > 0 and t["iqr"] >= 0 and t["blocks"] >= 1 and t["calls"] >= 1
        assert set(r["ratios"]) == want - {"fastconv"}
    for p in peers:
        assert res["geomean"][p] > 0
    return res


def test_core_rows_are_the_issue_2_gate():
    rows = bench_ops.build_rows("core")
    assert [r.id for r in rows] == (
        [f"conv2d/fwd+bwd/{layer}/n100" for layer in CORE_CONV_LAYERS[:4]] + ["conv2d/fwd+bwd/alexnet.conv1/n4"]
        + ["max_pool2d/fwd+bwd/mnist_cnn.pool1/n100", "max_pool2d/fwd+bwd/alexnet.pool1/n8"])
    shapes = [r.case.shape_str() for r in rows]
    assert shapes == ["(100,1,28,28)x(32,1,3,3) p1", "(100,32,14,14)x(64,32,3,3) p1", "(100,6,12,12)x(16,6,5,5)",
                      "(100,1,28,28)x(30,1,5,5)", "(4,3,224,224)x(64,3,11,11) s4 p2", "(100,32,28,28) k2 s2",
                      "(8,64,55,55) k3 s2"]
    assert all(r.core for r in rows)


def test_full_suite_covers_every_layer_and_pass():
    rows = bench_ops.build_rows("full")
    ids = {r.id for r in rows}
    for n in (1, 100, 512):
        for layer in ("mnist_cnn.conv1", "mnist_cnn.conv2", "lenet.conv1", "lenet.conv2", "simple_convnet.conv1"):
            for p in bench_ops.CONV_PASSES:
                assert f"conv2d/{p}/{layer}/n{n}" in ids
        for layer in ("mnist_cnn.pool1", "mnist_cnn.pool2", "lenet.pool1", "lenet.pool2", "simple_convnet.pool1"):
            for p in bench_ops.POOL_PASSES:
                assert f"max_pool2d/{p}/{layer}/n{n}" in ids
    for n in (1, 32):
        for i in range(1, 6):
            assert f"conv2d/fwd/alexnet.conv{i}/n{n}" in ids
        for i in range(1, 4):
            assert f"max_pool2d/bwd/alexnet.pool{i}/n{n}" in ids
    for layer in ("resnet.layer1", "resnet.layer2", "resnet.layer3"):
        assert f"conv2d/fwd+bwd/{layer}/n8" in ids
    # configurable_cnn has mnist_cnn's geometry: merged, and listed as an alias.
    conv1 = next(r for r in rows if r.id == "conv2d/fwd/mnist_cnn.conv1/n100")
    assert conv1.aliases == ["configurable_cnn.conv1"]
    assert {r.id for r in bench_ops.build_rows("core")} <= ids


def test_numpy_baseline_matches_torch():
    import numpy as np
    import numpy_im2col

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    args = ((2, 1), (1, 2), (2, 1), 2)
    y = torch.nn.functional.conv2d(x, w, b, *args)
    go = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), go)
    out, col = numpy_im2col.conv2d_forward(x.detach().numpy(), w.detach().numpy(), b.detach().numpy(), *args,
                                          return_col=True)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-12, atol=1e-12)
    for c in (None, col):
        got = numpy_im2col.conv2d_backward(go.numpy(), x.detach().numpy(), w.detach().numpy(), *args, col=c)
        for a, e in zip(got, grads):
            np.testing.assert_allclose(a, e.numpy(), rtol=1e-12, atol=1e-12)
    x32 = np.ones((1, 1, 4, 4), np.float32)
    assert numpy_im2col.conv2d_forward(x32, np.ones((1, 1, 3, 3), np.float32)).dtype == np.float32


def test_bench_ops_quick_tiny_cpu(tmp_path):
    out = tmp_path / "ops.json"
    stdout = run_script("bench_ops.py", "--quick", "--tiny", "--device", "cpu", "--min-run-time", "0.01",
                        "--json", str(out))
    assert "GEOMEAN fastconv/torch" in stdout
    res = check_ops_json(out, "core", True, ["torch", "numpy"])
    assert all(r["core"] for r in res["rows"])
    assert (tmp_path / "ops.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_ops_full_tiny_cpu(tmp_path):
    out = tmp_path / "full.json"
    run_script("bench_ops.py", "--suite", "full", "--tiny", "--device", "cpu", "--min-run-time", "0.001",
               "--peers", "torch,numpy,torch-no-onednn", "--threads", "1", "--json", str(out), "--no-png")
    res = check_ops_json(out, "full", True, ["torch", "numpy", "torch-no-onednn"])
    assert res["geomean_core"]["torch"] > 0


def check_train_json(path, modes):
    with open(path) as f:
        res = json.load(f)
    assert res["benchmark"] == "bench_train" and res["failures"] == []
    assert [r["id"] for r in res["rows"]] == [f"{m}/{mode}" for m in ("mnist_cnn", "alexnet") for mode in modes]
    for r in res["rows"]:
        assert r["check"]["ok"], r
        assert set(r["times"]) == {"fastconv", "torch"}, r["errors"]
        assert r["ratio"] > 0
    return res


@pytest.mark.slow
def test_bench_train_quick_tiny_cpu(tmp_path):
    out = tmp_path / "train.json"
    run_script("bench_train.py", "--quick", "--tiny", "--device", "cpu", "--min-run-time", "0.01", "--json", str(out))
    check_train_json(out, ["eager"])


@pytest.mark.cuda
@needs_cuda
def test_bench_ops_quick_tiny_cuda(tmp_path):
    out = tmp_path / "ops.json"
    run_script("bench_ops.py", "--quick", "--tiny", "--device", "cuda", "--json", str(out))
    res = check_ops_json(out, "core", True, ["torch", "torch-no-cudnn"])
    conv = [r for r in res["rows"] if r["op"] == "conv2d"]
    if bench_ops.gpu_peaks(res["env"]["device_name"]) is not None:
        assert all("peak_fraction" in r["fastconv_rate"] for r in conv)


@pytest.mark.slow
@pytest.mark.cuda
@needs_cuda
def test_bench_train_quick_tiny_cuda(tmp_path):
    out = tmp_path / "train.json"
    run_script("bench_train.py", "--quick", "--tiny", "--device", "cuda", "--json", str(out))
    check_train_json(out, ["eager", "cuda-graph"])


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_real_vs_random_pool_benchmark_runs():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_real_vs_random.py"), "--batch", "4",
                           "--min-run-time", "0.01"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("pool")]
    assert len(rows) == 4 and all(" real " in r or " random " in r for r in rows)
