"""Train the tutorial CNNs on MNIST-family images with fastconv, side by side with torch.nn.

    python -m fastconv.train                       # the quick main job (about a minute on 2 CPU cores)
    python -m fastconv.train --limit 0 --epochs 2  # full Fashion-MNIST, both implementations
    torchrun --nproc_per_node=2 -m fastconv.train  # the same, DistributedDataParallel over 2 processes

The default run trains the MNIST CNN on 10,000 Fashion-MNIST images for one epoch with fastconv's
layers and with torch.nn's, both from the same initial weights, the same data order and the same
dropout masks, and ends with a side-by-side table of loss, test accuracy and seconds per epoch.
By default the two are stepped in turn on every batch (``--schedule interleaved``) and each is timed
only over its own forward/backward/optimiser work, so both timings see the same machine load;
``--schedule sequential`` trains one after the other instead.
Into ``--out`` (default ``runs/``) it writes ``<model>_<dataset>.json`` (the log),
``<model>_<dataset>.png`` (loss and accuracy curves) and one checkpoint per implementation,
``<model>_<dataset>_<impl>.pt``, whose ``"model"`` entry is a state_dict that loads into either
implementation of the model; ``--resume`` continues from them.

Under torchrun (``WORLD_SIZE`` > 1) every process trains a DistributedSampler shard with
DistributedDataParallel (gloo on CPU, nccl on GPU); ``--batch-size`` is the global batch, split
evenly over the processes, so one step sees the same number of images as a single-process step.
Only rank 0 prints, logs and saves.
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, TensorDataset

from . import data as fc_data
from .models import IMPLS, MODEL_KWARGS, MODELS, RECIPES, build_model, canonical_name

__all__ = ["DistInfo", "comparison_table", "evaluate", "init_distributed", "main", "model_summary", "parse_args",
           "train_runs"]

CHECKPOINT_FORMAT = "fastconv-checkpoint/1"


# ----------------------------------------------------------------------------------------------
# Arguments


def _model_arg(text: str):
    """KEY=VALUE for the model constructor; VALUE parsed as JSON when it can be (3, [32,64], true)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-arg expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastconv.train",
        description="Train a tutorial CNN with fastconv's Conv2d/MaxPool2d and/or torch.nn's, side by side.",
    )
    p.add_argument("--model", default="mnist_cnn", type=canonical_name, choices=sorted(MODELS),
                   help="default: mnist_cnn (mnist-cnn is the same)")
    p.add_argument("--model-arg", action="append", default=[], type=_model_arg, metavar="KEY=VALUE",
                   help="extra model constructor argument, e.g. batch_norm=true or resize=224 (repeatable)")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(fc_data.DATASETS),
                   help="default: fashion-mnist")
    p.add_argument("--data-dir", default=None,
                   help="directory with the IDX files (else the Debian package, else a download into ./data)")
    p.add_argument("--no-download", action="store_true", help="never download the dataset")
    p.add_argument("--impl", default="both", choices=list(IMPLS) + ["both"],
                   help="fastconv's layers, torch.nn's, or both from the same initial weights (default: both)")
    p.add_argument("--fuse", action="store_true",
                   help="fastconv.fuse() the fastconv model: Conv2d-ReLU[-MaxPool2d] chains as one fused layer")
    p.add_argument("--epochs", type=int, default=1, help="total epochs; a resumed run trains the rest (default: 1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="global batch size, split over DDP processes (default: the recipe's, 100 for most models)")
    p.add_argument("--recipe", default="quick", choices=sorted(RECIPES),
                   help="optimiser, lr, momentum and batch size per model: 'quick' learns in the default short "
                        "run (Adam, lr 1e-3; lenet 3e-3; configurable_cnn 2e-3 at batch 25; alexnet 2e-4 at batch 50); "
                        "'tutorial' is each tutorial's exact recipe (plain SGD lr 0.01 for lenet and alexnet, "
                        "Adam 1e-3 for the others; batch 100) (default: quick)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam", "adamw"], help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: the recipe's)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--limit", type=int, default=10000,
                   help="train on the first N training images only; 0: all of them (default: 10000)")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images; 0: all (default: 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and dropout (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="runs", help="directory for the JSON log, PNG plot and checkpoints (default: runs)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint: without a value, each implementation's own in --out")
    p.add_argument("--schedule", default="interleaved", choices=["interleaved", "sequential"],
                   help="with several implementations: step them in turn on each batch, so the timings share "
                        "the machine's load, or train one after the other (default: interleaved)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not run one untimed step on a copy of each model before timing")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.limit < 0 or args.test_limit < 0:
        parser.error("--limit and --test-limit must be >= 0 (0 means everything)")
    recipe = RECIPES[args.recipe][args.model]
    args.optimizer = args.optimizer or recipe["optimizer"]
    args.lr = args.lr if args.lr is not None else recipe["lr"]
    args.momentum = args.momentum if args.momentum is not None else recipe["momentum"]
    args.batch_size = args.batch_size if args.batch_size is not None else recipe.get("batch_size", 100)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.model_kwargs = dict(MODEL_KWARGS.get(args.model, {}))
    args.model_kwargs.update(dict(args.model_arg))
    args.impls = list(IMPLS) if args.impl == "both" else [args.impl]
    return args


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); a no-op returning rank 0 of 1 when WORLD_SIZE is unset or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=_resolve_device(device, 0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def _all_reduce_sum(values: Sequence[float], info: DistInfo) -> List[float]:
    if not info.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# Model summary


def _short_type(m: nn.Module) -> str:
    mod = type(m).__module__
    if mod.startswith("torch.nn"):
        prefix = "nn"
    elif mod == __name__.rsplit(".", 1)[0] + ".models":
        prefix = "models"  # helpers such as models.Resize, not fastconv's kernels
    else:
        prefix = mod.split(".")[0]
    return f"{prefix}.{type(m).__name__}"


def model_summary(model: nn.Module, input_shape: Sequence[int]) -> List[Dict]:
    """One row per leaf module: name, type, output shape and parameter count, from forward hooks on
    a dummy input of ``input_shape`` (batch included), as the tutorials compute by hand."""
    rows: List[Dict] = []
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            shape = list(output.shape) if isinstance(output, torch.Tensor) else "?"
            rows.append({"name": name, "type": _short_type(module), "output_shape": shape,
                         "params": sum(p.numel() for p in module.parameters(recurse=False))})
        return fn

    for name, m in model.named_modules():
        if name and not list(m.children()):
            handles.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(*input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def format_summary(rows: List[Dict], model: nn.Module, title: str) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    w_name = max([len("layer")] + [len(r["name"]) for r in rows])
    w_type = max([len("type")] + [len(r["type"]) for r in rows])
    w_shape = max([len("output shape")] + [len(str(r["output_shape"])) for r in rows])
    lines = [title, f"  {'layer':<{w_name}}  {'type':<{w_type}}  {'output shape':<{w_shape}}  {'params':>10}"]
    for r in rows:
        lines.append(f"  {r['name']:<{w_name}}  {r['type']:<{w_type}}  {str(r['output_shape']):<{w_shape}}"
                     f"  {r['params']:>10,}")
    lines.append(f"  total parameters: {total:,} (trainable {trainable:,})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Data


def _load_data(args, info: DistInfo):
    train, test = fc_data.load(args.dataset, data_dir=args.data_dir, download=not args.no_download)
    source = train.source
    if args.limit:
        train = fc_data.Split(train.images[: args.limit], train.labels[: args.limit], source)
    if args.test_limit:
        test = fc_data.Split(test.images[: args.test_limit], test.labels[: args.test_limit], test.source)
    # Normalise once; the datasets are small enough to hold as float32 (188 MB for all of MNIST).
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    x_train = fc_data.normalize(train.images, args.dataset).to(dev)
    x_test = fc_data.normalize(test.images, args.dataset).to(dev)
    return (x_train, train.labels.to(dev)), (x_test, test.labels.to(dev)), source


def _train_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, epoch: int,
                  info: DistInfo) -> DataLoader:
    """Batches of the epoch's permutation. The order depends only on (seed, epoch), so every
    implementation and a resumed run see the same batches; under DDP a DistributedSampler
    (seeded the same way) gives each rank its shard."""
    dataset = TensorDataset(x, y)
    if info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
    # batch_size=None: the BatchSampler's index lists go straight into TensorDataset's tensor indexing.
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)


# ----------------------------------------------------------------------------------------------
# Training


def _optim_text(args) -> str:
    momentum = f" momentum {args.momentum:g}" if args.optimizer == "sgd" and args.momentum else ""
    return f"{args.optimizer} lr {args.lr:g}{momentum} ({args.recipe} recipe)"


def _make_optimizer(args, params):
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: DistInfo, batch_size: int = 500):
    """(mean loss, accuracy in %) over all of (x, y); under DDP each rank takes every world_size-th
    image and the counts are summed, so the result is exact."""
    model.eval()
    xs, ys = x[info.rank:: info.world_size], y[info.rank:: info.world_size]
    loss_sum = correct = 0.0
    for i in range(0, ys.numel(), batch_size):
        xb = xs[i: i + batch_size].to(info.device, non_blocking=True)
        yb = ys[i: i + batch_size].to(info.device, non_blocking=True)
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    loss_sum, correct, n = _all_reduce_sum([loss_sum, correct, float(ys.numel())], info)
    model.train()
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


def _warmup(model: nn.Module, x: torch.Tensor, info: DistInfo, batch: int) -> None:
    """One untimed forward/backward on a copy, so one-off costs (allocator, thread pools, lazy
    initialisation) do not land in the first implementation's epoch time."""
    m = copy.deepcopy(model).to(info.device)
    m.train()
    m(x[:batch].to(info.device)).sum().backward()
    _sync(info.device)


def _checkpoint_path(args, impl: str) -> str:
    return os.path.join(args.out, f"{args.model}_{args.dataset}_{impl}.pt")


def _log_path(args, ext: str) -> str:
    return os.path.join(args.out, f"{args.model}_{args.dataset}.{ext}")


def _save_checkpoint(path: str, args, impl: str, model: nn.Module, optimizer, epoch: int, history: Dict) -> None:
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_name": args.model,
        "model_kwargs": args.model_kwargs,
        "num_classes": 10,
        "in_channels": 1,
        "impl": impl,
        "epoch": epoch,  # epochs completed
        "model": model.state_dict(),  # the same keys for both impls: loads into build_model(..., impl="torch")
        "optimizer": optimizer.state_dict(),
        "history": history,
        "args": {k: v for k, v in vars(args).items() if k != "model_arg"},
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: str, args) -> Dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--resume: {path} is not a fastconv.train checkpoint")
    if ckpt["model_name"] != args.model:
        raise SystemExit(f"--resume: {path} holds a {ckpt['model_name']} model, not --model {args.model}")
    return ckpt


class _Run:
    """One implementation's training state: model (DDP-wrapped when distributed), optimiser, history,
    and its own RNG state so that interleaved runs still draw the same dropout masks."""

    def __init__(self, impl: str, model: nn.Module, args, info: DistInfo, start_epoch: int, history: Dict,
                 optimizer_state: Optional[Dict]):
        self.impl, self.model, self.args, self.info = impl, model.to(info.device), args, info
        self.start_epoch, self.history = start_epoch, history
        self.net = model
        if info.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        self.optimizer = _make_optimizer(args, model.parameters())
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.info.device) if self.info.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set_rng_state(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.info.device)

    def begin_epoch(self, epoch: int, n_local: int) -> None:
        # Dropout masks depend only on (seed, epoch): equal for every implementation and on resume.
        torch.manual_seed(self.args.seed + epoch)
        self.rng = self._rng_state()
        self.epoch, self.n_local = epoch, n_local
        self.loss_sum, self.seen, self.window, self.steps, self.train_s = 0.0, 0, [], [], 0.0
        self.net.train()

    def step(self, xb: torch.Tensor, yb: torch.Tensor, last: bool) -> None:
        """One optimiser step; only its own compute counts towards train_s."""
        self._set_rng_state(self.rng)
        _sync(self.info.device)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(xb), yb)
        loss.backward()
        self.optimizer.step()
        batch_loss = loss.item()  # waits for the device
        _sync(self.info.device)
        self.train_s += time.perf_counter() - t0
        self.rng = self._rng_state()
        self.loss_sum += batch_loss * yb.numel()
        self.seen += yb.numel()
        self.window.append(batch_loss)
        if len(self.window) == 10 or last:
            self.steps.append({"epoch": self.epoch + self.seen / self.n_local,
                               "loss": sum(self.window) / len(self.window)})
            self.window = []

    def progress(self) -> str:
        rate = self.seen * self.info.world_size / max(self.train_s, 1e-9)
        return f"{self.impl} loss {self.loss_sum / max(self.seen, 1):.4f} {rate:,.0f} img/s"

    def end_epoch(self, test_data, log) -> Dict:
        args, info = self.args, self.info
        loss_sum, seen = _all_reduce_sum([self.loss_sum, float(self.seen)], info)
        train_s = max(_all_reduce_sum([self.train_s], info)[0] / info.world_size, 1e-9)  # mean over ranks
        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(self.model, *test_data, info)
        eval_s = time.perf_counter() - t1
        record = {"epoch": self.epoch + 1, "train_loss": loss_sum / seen, "test_loss": test_loss,
                  "test_acc": test_acc, "train_s": train_s, "eval_s": eval_s, "img_per_s": seen / train_s,
                  "images": int(seen)}
        self.history["epochs"].append(record)
        self.history["steps"].extend(self.steps)
        log(f"[{self.impl}] epoch {self.epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}, "
            f"test loss {test_loss:.4f}, test acc {test_acc:.2f}%, train {train_s:.1f} s "
            f"({record['img_per_s']:,.0f} img/s), eval {eval_s:.1f} s")
        if info.is_main:
            _save_checkpoint(_checkpoint_path(args, self.impl), args, self.impl, self.model, self.optimizer,
                             self.epoch + 1, self.history)
        return record


def _train_epoch(runs: Sequence[_Run], epoch: int, args, train_data, test_data, info: DistInfo, log) -> None:
    """One epoch of every run in ``runs`` over the same batches; with several runs each batch goes
    through all of them in turn (interleaved), so they share whatever else the machine is doing."""
    x_train, y_train = train_data
    loader = _train_loader(x_train, y_train, args.batch_size // info.world_size, args.seed, epoch, info)
    n_local = len(loader.sampler.sampler)
    from tqdm import tqdm

    name = "+".join(r.impl for r in runs)
    bar = tqdm(total=n_local * info.world_size, desc=f"{name} epoch {epoch + 1}/{args.epochs}", unit="img",
               disable=args.no_progress or not info.is_main, leave=False, mininterval=0.5, file=sys.stderr,
               dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    for r in runs:
        r.begin_epoch(epoch, n_local)
    n_batches = len(loader)
    for i, (xb, yb) in enumerate(loader):
        xb = xb.to(info.device, non_blocking=True)
        yb = yb.to(info.device, non_blocking=True)
        # alternate who goes first, so neither always meets the fresh batch (and the other's
        # freed memory) first
        for r in (runs if i % 2 == 0 else list(reversed(runs))):
            r.step(xb, yb, last=i == n_batches - 1)
        bar.update(yb.numel() * info.world_size)
        bar.set_postfix_str(" | ".join(r.progress() for r in runs), refresh=False)
    bar.close()
    for r in runs:
        r.end_epoch(test_data, log)


def train_runs(runs: Sequence[_Run], args, train_data, test_data, info: DistInfo, log) -> None:
    """Train every run to ``args.epochs``: interleaved batch by batch (``--schedule interleaved``,
    fair timings on a shared machine) or one implementation after the other (``sequential``)."""
    if not args.no_warmup:
        for r in runs:
            _warmup(r.model, train_data[0], info, args.batch_size // info.world_size)
    if args.schedule == "interleaved":
        for epoch in range(min(r.start_epoch for r in runs), args.epochs):
            active = [r for r in runs if r.start_epoch <= epoch]
            _train_epoch(active, epoch, args, train_data, test_data, info, log)
    else:
        for r in runs:
            for epoch in range(r.start_epoch, args.epochs):
                _train_epoch([r], epoch, args, train_data, test_data, info, log)


# ----------------------------------------------------------------------------------------------
# Reporting


def comparison_table(runs: Dict[str, Dict]) -> str:
    """The side-by-side table: per epoch, each implementation's train loss, test accuracy and seconds."""
    impls = list(runs)
    n_epochs = max(len(h["epochs"]) for h in runs.values())
    col = 30
    head1 = "epoch | " + " | ".join(f"{impl:^{col}}" for impl in impls)
    head2 = "      | " + " | ".join(f"{'train loss':>10} {'test acc':>8} {'train s':>9}"[:col].ljust(col)
                                     for _ in impls)
    lines = [head1, head2, "-" * len(head2)]
    for e in range(n_epochs):
        cells = []
        for impl in impls:
            eps = runs[impl]["epochs"]
            if e < len(eps):
                r = eps[e]
                cells.append(f"{r['train_loss']:>10.4f} {r['test_acc']:>7.2f}% {r['train_s']:>9.1f}".ljust(col))
            else:
                cells.append(" " * col)
        lines.append(f"{e + 1:>5} | " + " | ".join(cells))
    totals = {impl: sum(r["train_s"] for r in h["epochs"]) for impl, h in runs.items()}
    finals = {impl: h["epochs"][-1]["test_acc"] for impl, h in runs.items() if h["epochs"]}
    lines.append("-" * len(head2))
    lines.append("final test accuracy: " + ", ".join(f"{impl} {acc:.2f}%" for impl, acc in finals.items()))
    lines.append("total train time:    " + ", ".join(f"{impl} {s:.1f} s" for impl, s in totals.items()))
    if "fastconv" in totals and "torch" in totals and totals["torch"] > 0:
        ratio = totals["fastconv"] / totals["torch"]
        lines.append(f"fastconv / torch train time: {ratio:.2f}x")
        if finals.keys() >= {"fastconv", "torch"}:
            lines.append(f"accuracy difference (fastconv - torch): {finals['fastconv'] - finals['torch']:+.2f} points")
    return "\n".join(lines)


def save_plot(path: str, runs: Dict[str, Dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"fastconv": {"color": "tab:blue", "linestyle": "-"}, "torch": {"color": "tab:orange", "linestyle": "--"}}
    for impl, h in runs.items():
        st = styles.get(impl, {})
        if h["steps"]:
            ax_loss.plot([s["epoch"] for s in h["steps"]], [s["loss"] for s in h["steps"]], label=f"{impl} (train)",
                         **st)
        if h["epochs"]:
            ax_loss.plot([r["epoch"] for r in h["epochs"]], [r["test_loss"] for r in h["epochs"]], marker="o",
                         label=f"{impl} (test)", color=st.get("color"), linestyle=":")
            ax_acc.plot([r["epoch"] for r in h["epochs"]], [r["test_acc"] for r in h["epochs"]], marker="o",
                        label=impl, **st)
    last = max([r["epoch"] for h in runs.values() for r in h["epochs"]] + [1])
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss", xlim=(0, last + 0.05))
    ax_acc.set_xlim(0, last + 0.05)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _loadavg() -> Optional[float]:
    """The 1-minute load average: other work on the machine skews the timings, so the log keeps it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _write_json(path: str, payload: Dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    if args.batch_size % info.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {info.world_size} processes")

    def log(msg: str = "") -> None:
        if info.is_main:
            print(msg, flush=True)

    load_start = _loadavg()
    try:
        try:
            train_data, test_data, source = _load_data(args, info)
        except (fc_data.DatasetNotFoundError, ValueError) as e:
            raise SystemExit(f"fastconv.train: {type(e).__name__}: {e}") from None
        log(f"fastconv.train: {args.model} on {args.dataset} ({source}): {train_data[1].numel():,} train / "
            f"{test_data[1].numel():,} test images; impl {args.impl}; {args.epochs} epoch(s), batch {args.batch_size}, "
            f"{_optim_text(args)}; device {info.device}"
            + (f" x {info.world_size} processes (DDP)" if info.enabled else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} threads")
        if info.is_main:
            os.makedirs(args.out, exist_ok=True)

        # Same seed, then copy the first model's weights into the others: identical starting points.
        torch.manual_seed(args.seed)
        models: Dict[str, nn.Module] = {}
        for impl in args.impls:
            torch.manual_seed(args.seed)
            models[impl] = build_model(args.model, impl=impl, **args.model_kwargs)
        first = args.impls[0]
        for impl in args.impls[1:]:
            models[impl].load_state_dict(models[first].state_dict())
        if args.fuse and "fastconv" in models:
            from .fused import fuse
            fuse(models["fastconv"])  # same parameters and state_dict keys, fused forward/backward

        input_shape = (1,) + tuple(train_data[0].shape[1:])
        rows = model_summary(models[first], input_shape)
        log(format_summary(rows, models[first], f"{args.model} ({first} layers), input {list(input_shape)}:"))
        for impl in args.impls[1:]:
            n_first = sum(p.numel() for p in models[first].parameters())
            n_other = sum(p.numel() for p in models[impl].parameters())
            log(f"  {impl} twin: same layers with {impl}'s Conv2d/MaxPool2d, {n_other:,} parameters "
                f"({'equal' if n_other == n_first else 'DIFFERENT'}), initial weights copied from {first}")
        log()

        runs: Dict[str, Dict] = {}
        payload = {
            "command": " ".join(["python -m fastconv.train", *(argv if argv is not None else sys.argv[1:])]),
            "args": {k: v for k, v in vars(args).items() if k != "model_arg"},
            "dataset_source": source, "train_images": int(train_data[1].numel()),
            "test_images": int(test_data[1].numel()), "device": str(info.device), "world_size": info.world_size,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "parameters": sum(p.numel() for p in models[first].parameters()),
            "summary": rows, "runs": runs,
        }
        runs_state: List[_Run] = []
        for impl in args.impls:
            history = {"epochs": [], "steps": []}
            start_epoch, opt_state = 0, None
            if args.resume:
                path = _checkpoint_path(args, impl) if args.resume == "auto" else args.resume
                ckpt = _load_checkpoint(path, args)
                models[impl].load_state_dict(ckpt["model"])
                opt_state, start_epoch = ckpt["optimizer"], ckpt["epoch"]
                history = ckpt.get("history") or history
                history["epochs"] = history["epochs"][:start_epoch]
                history["steps"] = [s for s in history["steps"] if s["epoch"] <= start_epoch + 1e-9]
                log(f"[{impl}] resumed from {path} after epoch {start_epoch}")
                if start_epoch >= args.epochs:
                    log(f"[{impl}] already trained {start_epoch} epoch(s), --epochs {args.epochs}: nothing to do")
            runs[impl] = history
            runs_state.append(_Run(impl, models[impl], args, info, start_epoch, history, opt_state))
        train_runs(runs_state, args, train_data, test_data, info, log)

        payload["loadavg"] = {"start": load_start, "end": _loadavg()}
        log()
        log(f"Side by side: {args.model} on {args.dataset}, {payload['train_images']:,} train images, "
            f"{args.epochs} epoch(s), batch {args.batch_size}, {_optim_text(args)}, {info.device}"
            + (f" x {info.world_size}" if info.enabled else f", {torch.get_num_threads()} threads")
            + (f"; 1-min load average {load_start:.2f} at start, {payload['loadavg']['end']:.2f} at end"
               f" on {os.cpu_count()} cores" if load_start is not None else ""))
        log(comparison_table(runs))
        if info.is_main:
            _write_json(_log_path(args, "json"), payload)
            save_plot(_log_path(args, "png"), runs,
                      f"{args.model} on {args.dataset} ({payload['train_images']:,} train images, {info.device})")
            log(f"\nwrote {_log_path(args, 'json')}, {_log_path(args, 'png')}, "
                + ", ".join(_checkpoint_path(args, impl) for impl in args.impls))
        if info.enabled:
            # Leave together: a rank that tears down gloo while rank 0 still writes the log and plot
            # can abort ("terminate called without an active exception").
            dist.barrier()
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
