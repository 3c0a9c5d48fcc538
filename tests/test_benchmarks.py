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

import fastconv  # noqa: E402  (the benchmarks need the built extension: no skipping)

from fcbench import cases, machine, numpy_im2col, peak, timing  # noqa: E402

CORE_CONV_LAYERS = ["mnist_cnn.conv1", "mnist_cnn.conv2", "lenet.conv2", "simple_convnet.conv1", "alexnet.conv1"]
CORE_POOL_LAYERS = ["mnist_cnn.pool1", "alexnet.pool1"]


def run_script(script, *args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (f"{script} {' '.join(args)} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    # A CPU-only run must not print torch.utils.cpp_extension's "No CUDA runtime is found" note.
    assert "No CUDA runtime" not in proc.stdout + proc.stderr
    return proc.stdout


def check_env(res, allocator="warm"):
    env = res["env"]
    for key in ("device_name", "torch", "git_commit", "threads", "cudnn", "cuda", "cpu", "allocator"):
        assert key in env
    cpu = env["cpu"]
    for key in ("vendor", "family", "model", "microarch", "flags", "simd"):
        assert key in cpu
    if machine._glibc():
        assert env["allocator"]["mode"] == allocator
        assert res["settings"]["allocator"] == allocator


def check_ops_json(path, suite, tiny, peers, allocator="warm"):
    with open(path) as f:
        res = json.load(f)
    assert res["benchmark"] == "bench_ops"
    assert res["failures"] == []
    assert res["fastconv"]["available"]
    check_env(res, allocator)
    assert res["settings"]["suite"] == suite and res["settings"]["tf32"] is False
    expected = [r.id for r in cases.build_rows(suite, tiny)]
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
        if r["op"] == "max_pool2d":
            assert r["algorithm"] == "direct"
        else:
            assert r["algorithm"] if hasattr(fastconv, "conv2d_algorithm") else r["algorithm"] == "im2col+gemm"
    for p in peers:
        assert res["geomean"][p] > 0
    passes = {(e["op"], e["pass"]) for e in res["summary"]}
    assert {(r["op"], r["pass"]) for r in res["rows"]} <= passes and ("all", "") in passes
    return res


def test_core_rows():
    rows = cases.build_rows("core")
    assert [r.id for r in rows] == (
        [f"conv2d/fwd+bwd/{layer}/n100" for layer in CORE_CONV_LAYERS[:4]] + ["conv2d/fwd+bwd/alexnet.conv1/n4"]
        + ["max_pool2d/fwd+bwd/mnist_cnn.pool1/n100", "max_pool2d/fwd+bwd/alexnet.pool1/n8"])
    shapes = [r.case.shape_str() for r in rows]
    assert shapes == ["(100,1,28,28)x(32,1,3,3) p1", "(100,32,14,14)x(64,32,3,3) p1", "(100,6,12,12)x(16,6,5,5)",
                      "(100,1,28,28)x(30,1,5,5)", "(4,3,224,224)x(64,3,11,11) s4 p2", "(100,32,28,28) k2 s2",
                      "(8,64,55,55) k3 s2"]
    assert all(r.core for r in rows)


def _geometries(rows):
    return {(r.case.op, r.case.geometry()) for r in rows}


@pytest.mark.parametrize("tiny", [False, True])
def test_full_suite_covers_every_layer_and_pass(tiny):
    rows = cases.build_rows("full", tiny)
    ids = {r.id for r in rows}
    assert len(ids) == len(rows)
    by_geom = {}
    for r in rows:
        by_geom.setdefault((r.case.op, r.case.geometry()), set()).add(r.pass_)
    for passes in by_geom.values():  # every conv in four passes, every pool in three
        assert passes in (set(cases.CONV_PASSES), set(cases.POOL_PASSES))
    if tiny:
        return
    # Every conv and pool layer of the five seed models, traced from fastconv.models itself.
    geoms = {g for g in by_geom}
    for n in (1, 100, 512):
        for name in ("mnist_cnn", "lenet", "simple_convnet", "configurable_cnn"):
            for c in cases.traced_layers(name, n, 28):
                assert (c.op, c.geometry()) in geoms, (name, n, c)
    for n in (1, 8, 32):
        for c in cases.traced_layers("alexnet", n, 224, in_channels=3):
            assert (c.op, c.geometry()) in geoms, ("alexnet", n, c)
    for i in range(1, 6):
        assert f"conv2d/bwd-weight/alexnet.conv{i}/n32" in ids
    # ResNet-18: stem 7x7/2 at 224, 3x3 at 64-512 channels, the 3x3/2 downsamples, the 1x1/2 shortcuts.
    want = {("resnet18.conv1", 4, 3, 224, 64, 7, 2)}
    for cin, cout, hw in ((64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7)):
        want.add((None, 8, cin, hw, cout, 3, 1))
    for cin, cout, hw in ((64, 128, 56), (128, 256, 28), (256, 512, 14)):
        want |= {(None, 8, cin, hw, cout, 3, 2), (None, 8, cin, hw, cout, 1, 2)}
    have = {(r.case.layer if r.case.layer == "resnet18.conv1" else None, r.case.n, r.case.c, r.case.h, r.case.cout,
             r.case.kh, r.case.stride[0]) for r in rows if r.op == "conv2d" and r.case.layer.startswith("resnet18")}
    assert want <= have, want - have
    assert "max_pool2d/fwd+bwd/resnet18.maxpool/n4" in ids
    # The depthwise 3x3 and the rows of issue #8's table.
    dw = next(r.case for r in rows if r.case.layer == "depthwise3x3")
    assert dw.shape_str() == "(8,96,56,56)x(96,1,3,3) p1 g96"
    issue8 = {r.case.shape_str() for r in rows if r.issue8}
    assert issue8 == {"(100,32,14,14)x(64,32,3,3) p1", "(100,6,12,12)x(16,6,5,5)", "(8,64,27,27)x(192,64,5,5) p2",
                      "(8,192,13,13)x(384,192,3,3) p1", "(8,128,28,28)x(128,128,3,3) p1",
                      "(4,3,224,224)x(64,3,7,7) s2 p3", "(8,64,56,56)x(128,64,3,3) s2 p1",
                      "(8,256,28,28)x(64,256,1,1)", "(8,96,56,56)x(96,1,3,3) p1 g96"}
    # configurable_cnn has mnist_cnn's geometry: merged, and listed as an alias.
    conv1 = next(r for r in rows if r.id == "conv2d/fwd/mnist_cnn.conv1/n100")
    assert conv1.aliases == ["configurable_cnn.conv1"]
    assert {r.id for r in cases.build_rows("core")} <= ids


def test_numpy_baseline_matches_torch():
    import numpy as np

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


def test_cpu_decoding():
    assert machine.microarch("AuthenticAMD", 25, 17) == "Zen 4 (Genoa)"
    assert machine.microarch("AuthenticAMD", 26, 2).startswith("Zen 5")
    assert machine.microarch("AuthenticAMD", 26, 0x44).startswith("Zen 5")
    assert machine.microarch("GenuineIntel", 6, 0x8f) == "Sapphire Rapids"
    assert machine.microarch("SomeVendor", 7, 1) == "SomeVendor family 7 model 1"
    # a hypervisor-masked model number: the flags still show an AMX server part
    assert machine.microarch("GenuineIntel", 6, 167, ["avx512f", "amx_tile"]).startswith("Sapphire Rapids-class")
    assert machine.microarch("GenuineIntel", 6, 167) == "GenuineIntel family 6 model 167"
    info = machine.cpu_info()
    assert info["model_name"] and isinstance(info["simd"], list)


def test_timing_loop_interleaves_and_formats():
    clock = timing.make_clock("wall", False, 2)
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    res = timing.interleaved(fns, 0.0, clock, min_blocks=4, block_time=1e-4)
    for name in ("a", "b"):
        assert res[name].error is None and len(res[name].block_times) >= 4
        st = timing.stats(res[name])
        assert st["min"] <= st["median"] and st["calls"] == st["blocks"] * st["calls_per_block"]
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]  # a a b b b a ... -> a b a ...
    assert len(runs) >= 2 + 4  # warmup a, b; then blocks A B B A A B B A: the peers take turns
    failing = timing.interleaved({"bad": lambda: 1 / 0, "ok": lambda: None}, 0.0, clock, min_blocks=2)
    assert "ZeroDivisionError" in failing["bad"].error and failing["ok"].error is None
    assert timing.fmt_time(1.351) == "1.351 s" and timing.fmt_time(1.251) == "1.251 s"
    assert timing.fmt_time(0.01234) == "12.34 ms" and timing.fmt_time(874.6e-6) == "874.6 us"


def test_fp32_peak_is_measured():
    cpu = machine.cpu_info()
    pk = peak.measure_peak(cpu, 1)
    assert pk["gflops"] > 0 and pk["method"] and pk["kind"]
    if "avx2" in cpu["simd"] and "fma" in cpu["simd"] and os.path.exists("/usr/bin/cc"):
        assert pk["kind"] == "measured peak", pk
    assert peak.measure_peak(cpu, 1, "off") is None


def test_bench_ops_quick_tiny_cpu(tmp_path):
    out = tmp_path / "ops.json"
    stdout = run_script("bench_ops.py", "--quick", "--tiny", "--device", "cpu", "--min-run-time", "0.01",
                        "--json", str(out))
    assert "GEOMEAN fastconv/torch" in stdout and "fp32 peak:" in stdout
    if machine._glibc():
        assert "allocator: WARM" in stdout
    res = check_ops_json(out, "core", True, ["torch", "numpy"])
    assert all(r["core"] for r in res["rows"])
    assert res["settings"]["peak"]["gflops"] > 0
    assert all(r["peak_fraction"]["fastconv"] > 0 for r in res["rows"] if r["op"] == "conv2d")
    assert (tmp_path / "ops.png").stat().st_size > 0


def test_bench_ops_cold_filtered(tmp_path):
    out = tmp_path / "cold.json"
    env = dict(os.environ, **machine.WARM_ENV)  # --cold must undo these
    stdout = run_script("bench_ops.py", "--suite", "full", "--tiny", "--device", "cpu", "--cold", "--peak", "mm",
                        "--filter", "conv2d/bwd-.*/lenet.conv2/n2", "--min-run-time", "0.001", "--min-blocks", "1",
                        "--json", str(out), "--no-png", env=env)
    with open(out) as f:
        res = json.load(f)
    assert [r["id"] for r in res["rows"]] == ["conv2d/bwd-input/lenet.conv2/n2", "conv2d/bwd-weight/lenet.conv2/n2"]
    assert "lower bound" in res["settings"]["peak"]["kind"]
    if machine._glibc():
        assert res["env"]["allocator"]["mode"] == "cold" and "allocator: COLD" in stdout


def test_bench_ops_channels_last_filtered(tmp_path):
    """--channels-last: every peer gets channels_last inputs (checked against torch like any row), and the
    JSON says so; the algorithm column is the one a channels_last input runs."""
    out = tmp_path / "cl.json"
    run_script("bench_ops.py", "--suite", "full", "--tiny", "--device", "cpu", "--channels-last", "--peers", "torch",
               "--filter", "conv2d/fwd/resnet50.layer1.0.conv3/", "--min-run-time", "0.001", "--min-blocks", "1",
               "--json", str(out), "--no-png")
    with open(out) as f:
        res = json.load(f)
    assert res["settings"]["memory_format"] == "channels_last" and res["failures"] == []
    (row,) = res["rows"]
    geo = row["geometry"]
    assert row["pass"] == "fwd" and row["check"]
    x = torch.empty(geo["n"], geo["c"], geo["h"], geo["w"]).contiguous(memory_format=torch.channels_last)
    assert row["algorithm"] == fastconv.conv2d_algorithm(x, torch.empty(geo["cout"], geo["c"], geo["kh"], geo["kw"]))


@pytest.mark.slow
def test_bench_ops_full_tiny_cpu(tmp_path):
    out = tmp_path / "full.json"
    run_script("bench_ops.py", "--suite", "full", "--tiny", "--device", "cpu", "--min-run-time", "0.001",
               "--min-blocks", "1", "--peers", "torch,numpy,torch-no-onednn", "--threads", "1", "--json", str(out),
               "--no-png")
    res = check_ops_json(out, "full", True, ["torch", "numpy", "torch-no-onednn"])
    assert res["geomean_core"]["torch"] > 0
    assert any(e["op"] == "issue #8 rows" for e in res["summary"])


def check_train_json(path, modes):
    with open(path) as f:
        res = json.load(f)
    assert res["benchmark"] == "bench_train" and res["failures"] == []
    check_env(res)
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
def test_bench_ops_quick_tiny_cuda(tmp_path):
    out = tmp_path / "ops.json"
    run_script("bench_ops.py", "--quick", "--tiny", "--device", "cuda", "--json", str(out))
    res = check_ops_json(out, "core", True, ["torch", "torch-no-cudnn"])
    conv = [r for r in res["rows"] if r["op"] == "conv2d"]
    if peak.gpu_peaks(res["env"]["device_name"]) is not None:
        assert all("fastconv" in r["peak_fraction"] for r in conv)


@pytest.mark.slow
@pytest.mark.cuda
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


def test_algorithm_column_reads_fastconv(monkeypatch):
    from fcbench import peers

    conv_case = cases.build_rows("core", tiny=True)[0].case
    pool_case = cases.build_rows("core", tiny=True)[-1].case
    inp = peers.make_inputs(conv_case, torch.device("cpu"), torch.float32, 0)
    assert peers.algorithm(pool_case, inp) == "direct"
    monkeypatch.delattr(fastconv, "conv2d_algorithm", raising=False)
    assert peers.algorithm(conv_case, inp) == "im2col+gemm"
    seen = []

    def algo(x, w, stride, padding, dilation, groups):
        seen.append((tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation), groups))
        return "packed-gemm"

    monkeypatch.setattr(fastconv, "conv2d_algorithm", algo, raising=False)
    assert peers.algorithm(conv_case, inp) == "packed-gemm"
    assert seen == [((2, 1, 28, 28), (32, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1)]


def test_bench_recycled_memory_runs():
    out = run_script("bench_recycled_memory.py", "--layers", "lenet.conv2/n100", "--passes", "fwd,bwd-weight",
                     "--threads", "1")
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert [(r[0], r[1]) for r in rows] == [("lenet.conv2/n100", "fwd"), ("lenet.conv2/n100", "bwd-weight")]
    assert all(float(r[4]) > 0 for r in rows)  # a ratio was measured (not asserted on: timing)
