"""fastconv.train: training falls, checkpoints load into torch.nn, and the CLI end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastconv import data, train
from fastconv.models import build_model

from tiny_data import synthetic_digits, write_tiny_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, env=None):
    proc = subprocess.run([sys.executable, "-m", "fastconv.train", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc


def test_defaults_are_the_quick_main_job():
    args = train.parse_args([])
    assert (args.model, args.dataset, args.impl, args.epochs, args.limit) == (
        "mnist_cnn", "fashion-mnist", "both", 1, 10000)
    assert (args.recipe, args.optimizer, args.lr, args.momentum, args.batch_size) == ("quick", "adam", 1e-3, 0.0, 100)
    assert args.impls == ["fastconv", "torch"] and args.out == "runs"
    # the quick recipe learns in the default run; the tutorial's exact one is a flag away
    assert [(a.optimizer, a.lr, a.batch_size) for a in (train.parse_args(["--model", m]) for m in ("lenet", "alexnet"))
            ] == [("adam", 3e-3, 100), ("adam", 2e-4, 50)]
    for m in ("lenet", "alexnet"):
        tut = train.parse_args(["--model", m, "--recipe", "tutorial"])
        assert (tut.optimizer, tut.lr, tut.momentum, tut.batch_size) == ("sgd", 0.01, 0.0, 100)
    assert train.parse_args(["--model", "alexnet", "--batch-size", "10"]).batch_size == 10
    mixed = train.parse_args(["--model", "lenet", "--recipe", "tutorial", "--momentum", "0.9", "--lr", "0.05"])
    assert (mixed.optimizer, mixed.lr, mixed.momentum) == ("sgd", 0.05, 0.9)
    alex = train.parse_args(["--model", "alexnet", "--model-arg", "dropout=0.2"])
    assert alex.model_kwargs == {"resize": 63, "dropout": 0.2}
    cnn = train.parse_args(["--model", "configurable-cnn"])
    assert (cnn.optimizer, cnn.lr, cnn.batch_size) == ("adam", 2e-3, 25)
    cfg = train.parse_args(["--model", "configurable_cnn", "--model-arg", "conv_channels=[8,16]",
                            "--model-arg", "batch_norm=true"])
    assert cfg.model_kwargs == {"conv_channels": [8, 16], "batch_norm": True}


@pytest.mark.parametrize("spelling", ["mnist-cnn", "mnist_cnn", "MNIST-CNN"])
def test_model_name_accepts_both_spellings(spelling):
    assert train.parse_args(["--model", spelling]).model == "mnist_cnn"
    assert train.parse_args(["--model", "simple-convnet"]).model == "simple_convnet"


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "resnet"])
    assert "invalid choice" in capsys.readouterr().err


def test_model_summary_shapes_and_params():
    model = build_model("mnist_cnn", impl="fastconv")
    rows = train.model_summary(model, (1, 1, 28, 28))
    assert [(r["name"], r["type"], r["output_shape"], r["params"]) for r in rows] == [
        ("layer1.0", "fastconv.Conv2d", [1, 32, 28, 28], 320),
        ("layer1.1", "nn.ReLU", [1, 32, 28, 28], 0),
        ("layer1.2", "fastconv.MaxPool2d", [1, 32, 14, 14], 0),
        ("layer2.0", "fastconv.Conv2d", [1, 64, 14, 14], 18_496),
        ("layer2.1", "nn.ReLU", [1, 64, 14, 14], 0),
        ("layer2.2", "fastconv.MaxPool2d", [1, 64, 7, 7], 0),
        ("fc", "nn.Linear", [1, 10], 31_370),
    ]
    assert "total parameters: 50,186" in train.format_summary(rows, model, "mnist_cnn")
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


@pytest.mark.parametrize("name", ["mnist_cnn", "lenet", "simple_convnet"])
def test_tiny_training_run_loss_falls_and_matches_torch(name):
    images, labels = synthetic_digits(200)
    x, y = data.normalize(images, "mnist"), labels.long()
    losses = {}
    torch.manual_seed(0)
    ref = build_model(name, impl="torch")
    for impl in ("fastconv", "torch"):
        model = build_model(name, impl=impl)
        model.load_state_dict(ref.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        losses[impl] = []
        for step in range(20):
            idx = torch.arange(step * 50, step * 50 + 50) % 200
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    for impl, ls in losses.items():
        assert sum(ls[-4:]) / 4 < 0.5 * sum(ls[:4]) / 4, f"{impl}: loss did not fall: {ls}"
    # Same start, same batches: the two implementations follow the same trajectory.
    torch.testing.assert_close(torch.tensor(losses["fastconv"]), torch.tensor(losses["torch"]), rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_cli_end_to_end_and_resume(tmp_path):
    data_dir = write_tiny_mnist(tmp_path / "data")
    out = tmp_path / "runs"
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--limit", "200",
              "--batch-size", "50", "--out", str(out), "--no-progress"]
    proc = run_cli(*common, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout
    # The layer table, the per-epoch lines of both implementations, and the side-by-side table.
    assert "fastconv.Conv2d" in stdout and "[1, 64, 7, 7]" in stdout and "total parameters: 50,186" in stdout
    assert "[fastconv] epoch 1/1" in stdout and "[torch] epoch 1/1" in stdout
    assert "Side by side" in stdout and "fastconv / torch train time" in stdout

    log = json.loads((out / "mnist_cnn_mnist.json").read_text())
    assert set(log["runs"]) == {"fastconv", "torch"}
    assert log["train_images"] == 200 and log["test_images"] == 100 and log["parameters"] == 50_186
    ep_fc, ep_tn = log["runs"]["fastconv"]["epochs"][0], log["runs"]["torch"]["epochs"][0]
    for key in ("train_loss", "test_acc", "train_s", "eval_s", "img_per_s"):
        assert key in ep_fc
    # Same initial weights, data order and dropout: the implementations agree to float rounding.
    assert abs(ep_fc["train_loss"] - ep_tn["train_loss"]) < 1e-3
    assert abs(ep_fc["test_acc"] - ep_tn["test_acc"]) <= 1.0
    png = out / "mnist_cnn_mnist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The checkpoint's state_dict loads into the torch.nn model (strictly) and gives the same outputs.
    for impl in ("fastconv", "torch"):
        ckpt = torch.load(out / f"mnist_cnn_mnist_{impl}.pt", map_location="cpu", weights_only=False)
        assert ckpt["epoch"] == 1 and ckpt["impl"] == impl and ckpt["model_name"] == "mnist_cnn"
        tn = build_model("mnist_cnn", impl="torch")
        tn.load_state_dict(ckpt["model"])
        fc = build_model("mnist_cnn", impl="fastconv")
        fc.load_state_dict(ckpt["model"])
        x = torch.randn(5, 1, 28, 28)
        torch.testing.assert_close(fc(x), tn(x), rtol=1e-4, atol=1e-5)

    # --resume continues to epoch 2 from the checkpoints.
    proc = run_cli(*common, "--epochs", "2", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "[fastconv] epoch 2/2" in proc.stdout
    assert "epoch 1/2" not in proc.stdout
    log = json.loads((out / "mnist_cnn_mnist.json").read_text())
    for impl in ("fastconv", "torch"):
        assert [e["epoch"] for e in log["runs"][impl]["epochs"]] == [1, 2]
        assert torch.load(out / f"mnist_cnn_mnist_{impl}.pt", weights_only=False)["epoch"] == 2


def test_resume_matches_uninterrupted_run(tmp_path):
    """Two epochs in one go == one epoch, then --resume for the second (data order and dropout depend
    only on seed and epoch; the optimiser state is in the checkpoint)."""
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=100, n_test=20)
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--batch-size", "50",
              "--impl", "torch", "--model", "configurable_cnn", "--model-arg", "conv_channels=[4,8]",
              "--model-arg", "hidden=[16]"]
    args_full = common + ["--epochs", "2", "--out", str(tmp_path / "a")]
    assert train.main(args_full + ["--no-progress"]) == 0
    assert train.main(common + ["--epochs", "1", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert train.main(common + ["--epochs", "2", "--out", str(tmp_path / "b"), "--no-progress", "--resume"]) == 0
    a = torch.load(tmp_path / "a" / "configurable_cnn_mnist_torch.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "configurable_cnn_mnist_torch.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], msg=k)


def test_cli_missing_dataset_names_the_three_ways(tmp_path):
    proc = run_cli("--dataset", "kmnist", "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path))
    assert proc.returncode != 0
    assert "DatasetNotFoundError: could not find the kmnist dataset" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--data-dir" in proc.stderr and "dataset-fashion-mnist" in proc.stderr and "codh.rois.ac.jp" in proc.stderr


def test_resume_rejects_wrong_model(tmp_path):
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=50, n_test=10)
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--batch-size", "50",
              "--impl", "torch", "--no-progress", "--out", str(tmp_path / "o")]
    assert train.main(common + ["--model", "lenet"]) == 0
    ckpt = str(tmp_path / "o" / "lenet_mnist_torch.pt")
    with pytest.raises(SystemExit, match="holds a lenet model"):
        train.main(common + ["--model", "mnist_cnn", "--resume", ckpt])


def test_interleaved_schedule_equals_sequential(tmp_path):
    """Stepping both implementations in turn on each batch changes nothing but the timing: each keeps
    its own RNG stream, so dropout masks (and hence weights) are those of one-after-the-other runs."""
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=100, n_test=20)
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--batch-size", "25",
              "--model", "configurable_cnn", "--model-arg", "conv_channels=[4,8]", "--model-arg", "hidden=[16]",
              "--no-progress", "--epochs", "1"]
    for schedule in ("interleaved", "sequential"):
        assert train.main(common + ["--schedule", schedule, "--out", str(tmp_path / schedule)]) == 0
    for impl in ("fastconv", "torch"):
        a = torch.load(tmp_path / "interleaved" / f"configurable_cnn_mnist_{impl}.pt", weights_only=False)["model"]
        b = torch.load(tmp_path / "sequential" / f"configurable_cnn_mnist_{impl}.pt", weights_only=False)["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{impl} {k}")
    # And the two implementations, dropout included, end up with the same weights up to rounding.
    fc = torch.load(tmp_path / "interleaved" / "configurable_cnn_mnist_fastconv.pt", weights_only=False)["model"]
    tn = torch.load(tmp_path / "interleaved" / "configurable_cnn_mnist_torch.pt", weights_only=False)["model"]
    for k in fc:
        torch.testing.assert_close(fc[k], tn[k], rtol=1e-3, atol=1e-4, msg=k)


def test_fuse_flag_trains_the_fused_model_to_the_same_weights(tmp_path):
    """--fuse: the fastconv model is fastconv.fuse()d; same checkpoint keys, same training up to rounding."""
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=100, n_test=20)
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--batch-size", "25",
              "--model", "mnist_cnn", "--no-progress", "--epochs", "1", "--out", str(tmp_path / "run")]
    assert train.main(common + ["--fuse"]) == 0
    fc = torch.load(tmp_path / "run" / "mnist_cnn_mnist_fastconv.pt", weights_only=False)["model"]
    tn = torch.load(tmp_path / "run" / "mnist_cnn_mnist_torch.pt", weights_only=False)["model"]
    assert list(fc) == list(tn)
    for k in fc:
        torch.testing.assert_close(fc[k], tn[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.cuda
def test_cli_on_cuda(tmp_path):
    data_dir = write_tiny_mnist(tmp_path / "data", n_train=200, n_test=50)
    proc = run_cli("--dataset", "mnist", "--data-dir", data_dir, "--no-download", "--batch-size", "50",
                   "--device", "cuda", "--out", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    log = json.loads((tmp_path / "o" / "mnist_cnn_mnist.json").read_text())
    assert log["device"].startswith("cuda")
    fc, tn = log["runs"]["fastconv"]["epochs"][0], log["runs"]["torch"]["epochs"][0]
    assert abs(fc["train_loss"] - tn["train_loss"]) < 1e-2  # cuDNN may use TF32
    # A checkpoint written on the GPU loads into the CPU torch.nn model.
    ckpt = torch.load(tmp_path / "o" / "mnist_cnn_mnist_fastconv.pt", map_location="cpu", weights_only=False)
    build_model("mnist_cnn", impl="torch").load_state_dict(ckpt["model"])
