"""DistributedDataParallel over 2 CPU processes (gloo on 127.0.0.1): the averaged gradients of a
fastconv model equal a single-process step on the whole batch, and the CLI runs under torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastconv import train
from fastconv.models import build_model

from tiny_data import write_tiny_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
BATCH = 8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    g = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _worker(rank: int, port: int, out_dir: str, model_name: str) -> None:
    # The environment torchrun would set; fastconv.train.init_distributed reads it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = train.init_distributed("cpu")
    try:
        assert dist.get_backend() == "gloo" and info.rank == rank and info.world_size == WORLD
        torch.manual_seed(rank)  # a different init per rank: DDP must broadcast rank 0's weights
        model = build_model(model_name, impl="fastconv")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = _batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        F.cross_entropy(ddp(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save({"params": {k: p.detach().clone() for k, p in model.named_parameters()},
                        "grads": {k: p.grad.clone() for k, p in model.named_parameters()}},
                       os.path.join(out_dir, "ddp.pt"))
        else:
            torch.save({k: p.grad.clone() for k, p in model.named_parameters()}, os.path.join(out_dir, "rank1.pt"))
        dist.barrier()  # leave together (see fastconv.train.main)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["mnist_cnn"])
def test_ddp_gradients_equal_single_process_full_batch(tmp_path, model_name):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), model_name), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    grads_rank1 = torch.load(tmp_path / "rank1.pt")

    # Single process: rank 0's weights (DDP broadcast them), the whole batch, a mean loss.
    model = build_model(model_name, impl="fastconv")
    model.load_state_dict(ddp["params"])  # mnist_cnn has no buffers: parameters are the whole state
    assert all(type(m).__module__.startswith("fastconv") for m in model.modules()
               if type(m).__name__ in ("Conv2d", "MaxPool2d"))
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ddp["grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(grads_rank1[k], ddp["grads"][k], rtol=0, atol=0, msg=k)  # all-reduced


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=200, n_test=50)
    out = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "fastconv.train", "--dataset", "mnist", "--data-dir", data_dir,
           "--no-download", "--limit", "200", "--batch-size", "50", "--out", str(out), "--impl", "fastconv",
           "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    # Only rank 0 prints and writes.
    assert proc.stdout.count("fastconv.train: mnist_cnn") == 1
    assert proc.stdout.count("[fastconv] epoch 1/1") == 1
    assert "x 2 processes (DDP)" in proc.stdout
    log = json.loads((out / "mnist_cnn_mnist.json").read_text())
    assert log["world_size"] == WORLD
    # Every image is seen once per epoch across the two ranks, and the test set is evaluated whole.
    assert log["runs"]["fastconv"]["epochs"][0]["images"] == 200
    assert sorted(os.listdir(out)) == ["mnist_cnn_mnist.json", "mnist_cnn_mnist.png", "mnist_cnn_mnist_fastconv.pt"]
    ckpt = torch.load(out / "mnist_cnn_mnist_fastconv.pt", weights_only=False)
    build_model("mnist_cnn", impl="torch").load_state_dict(ckpt["model"])  # no "module." prefix
