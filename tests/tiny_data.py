"""A tiny learnable MNIST-format dataset on disk, for the training CLI's tests."""
import os

import torch

from fastconv import data


def synthetic_digits(n: int, seed: int = 0):
    """uint8 28x28 images whose class is where a bright 8x8 square sits (on noise): learnable in a
    few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 28, 28), generator=g).to(torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = 2 + (c // 5) * 14, 1 + (c % 5) * 5
        images[i, r: r + 8, col: col + 8] = 230
    return images, labels.to(torch.uint8)


def write_tiny_mnist(directory, n_train=300, n_test=100):
    """Writes ``synthetic_digits`` as the four gzipped IDX files of MNIST into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        data.write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images)
        data.write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(directory)
