"""MNIST-family datasets without torchvision: an IDX reader and a loader that finds the files.

The four files of MNIST, Fashion-MNIST and KMNIST are in the IDX format
(http://yann.lecun.com/exdb/mnist/): a 4-byte big-endian magic ``0x0000TTNN`` (``TT`` the element
type, ``NN`` the number of dimensions), ``NN`` big-endian uint32 sizes, then the elements. The
files usually come gzipped.

Where :func:`load` looks for a dataset, in this order:

1. ``data_dir`` (``--data-dir``): the four files, gzipped or not, in ``data_dir`` or
   ``data_dir/<name>`` (``name`` as in :data:`DATASETS`, e.g. ``data/mnist/``).
2. The Debian package ``dataset-fashion-mnist`` (``apt install dataset-fashion-mnist``), which puts
   Fashion-MNIST in ``/usr/share/datasets/fashion-mnist/``: the default on an offline machine.
3. A download from the dataset's usual mirrors into ``data_dir`` (default ``./data``), each file
   checked against its published MD5 before it is used.

When none of them works, :class:`DatasetNotFoundError` names all three. A file that is not valid
IDX (bad magic, wrong dimensions, too short or too long, broken gzip) raises ``ValueError`` naming
the file; it never yields a tensor of garbage.
"""
import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DEBIAN_DATASETS_DIR",
    "DatasetNotFoundError",
    "DatasetSpec",
    "Split",
    "load",
    "load_split",
    "normalize",
    "read_idx",
    "write_idx",
]

DEBIAN_DATASETS_DIR = "/usr/share/datasets"

# IDX element type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e}); delete it and fetch it again") from e
    if path.endswith(".gz"):
        raise ValueError(f"{path}: named .gz but does not start with the gzip magic 1f 8b")
    return raw


def read_idx(path: str, expected_ndim: Optional[int] = None) -> torch.Tensor:
    """Read an IDX file (gzipped or raw) into a tensor (``torch.uint8`` for MNIST-style files).

    Raises ``ValueError`` naming ``path`` if the header is not IDX, the number of dimensions is not
    ``expected_ndim``, or the data is shorter or longer than the header's sizes say.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes, need at least 4)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic 0x{data[:4].hex()} (expected 0x0000TTNN with element type TT in "
            f"{{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}})"
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_len} for {ndim} dims)")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: shape {tuple(shape)} of {dtype.name} needs {expected} data bytes, file has {got}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=header_len).reshape(shape)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str, tensor: torch.Tensor, compress: Optional[bool] = None) -> None:
    """Write ``tensor`` as an IDX file (gzipped when ``compress`` or when ``path`` ends in .gz)."""
    arr = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    code = next((c for c, dt in _IDX_DTYPES.items()
                 if dt.kind == arr.dtype.kind and dt.itemsize == arr.dtype.itemsize), None)
    if code is None:
        raise ValueError(f"write_idx: IDX cannot hold dtype {arr.dtype}")
    payload = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mean: float  # of the training images scaled to [0, 1]
    std: float
    mirrors: Tuple[str, ...]
    md5: Dict[str, str]  # of the published .gz files
    classes: Tuple[str, ...]


_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

DATASETS: Dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", 0.1307, 0.3081,
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": DatasetSpec(
        # mean/std measured on the 60000 training images (tests/test_data.py checks them).
        "fashion-mnist", 0.2860, 0.3530,
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": DatasetSpec(
        "kmnist", 0.1918, 0.3483,
        ("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}


class DatasetNotFoundError(FileNotFoundError):
    """None of the three sources (data dir, Debian package, download) had the dataset."""


@dataclass
class Split:
    """One split of a dataset: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    source: str  # the directory or URL the files came from

    def __len__(self) -> int:
        return self.labels.numel()


def _spec(name: str) -> DatasetSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[key]


def _find_in(directory: str, stem: str) -> Optional[str]:
    for fname in (stem + ".gz", stem):
        p = os.path.join(directory, fname)
        if os.path.isfile(p):
            return p
    return None


def _dir_with_all(directory: str, stems: Sequence[str]) -> Optional[Dict[str, str]]:
    found = {s: _find_in(directory, s) for s in stems}
    return found if all(found.values()) else None


def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: str, md5: str, timeout: float) -> None:
    """Fetch ``url`` to ``dest`` atomically; the file only appears if its MD5 matches."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", suffix=".part")
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "fastconv"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        got = _md5(tmp)
        if got != md5:
            raise ValueError(f"{url}: MD5 {got} does not match the published {md5}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _try_download(spec: DatasetSpec, stems: Sequence[str], directory: str, mirrors: Sequence[str],
                  timeout: float) -> Tuple[Optional[Dict[str, str]], List[str]]:
    errors = []
    paths = {}
    for stem in stems:
        fname = stem + ".gz"
        dest = os.path.join(directory, fname)
        if os.path.isfile(dest) and _md5(dest) == spec.md5[fname]:
            paths[stem] = dest
            continue
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + fname
            try:
                _download(url, dest, spec.md5[fname], timeout)
                paths[stem] = dest
                break
            except (OSError, ValueError, urllib.error.URLError) as e:
                errors.append(f"{url}: {e}")
        else:
            return None, errors
    return paths, errors


def _locate(spec: DatasetSpec, stems: Sequence[str], data_dir: Optional[str], download: bool,
            mirrors: Optional[Sequence[str]], timeout: float) -> Tuple[Dict[str, str], str]:
    tried = []
    # 1. --data-dir, directly or in a subdirectory named after the dataset.
    if data_dir is not None:
        for d in (data_dir, os.path.join(data_dir, spec.name)):
            found = _dir_with_all(d, stems)
            if found:
                return found, d
        tried.append(f"--data-dir {data_dir} (and {os.path.join(data_dir, spec.name)}): files not there")
    # 2. The Debian package (dataset-fashion-mnist ships /usr/share/datasets/fashion-mnist).
    debian = os.path.join(DEBIAN_DATASETS_DIR, spec.name)
    found = _dir_with_all(debian, stems)
    if found:
        return found, debian
    tried.append(f"{debian}: not there")
    # 3. A checksummed download.
    directory = os.path.join(data_dir if data_dir is not None else "data", spec.name)
    mirrors = spec.mirrors if mirrors is None else tuple(mirrors)
    if download and mirrors:
        found, errors = _try_download(spec, stems, directory, mirrors, timeout)
        if found:
            return found, directory
        tried += [f"download: {e}" for e in errors] or ["download: no mirror answered"]
    else:
        tried.append("download: disabled")
    files = ", ".join(s + "[.gz]" for s in stems)
    raise DatasetNotFoundError(
        f"could not find the {spec.name} dataset ({files}). Three ways to provide it:\n"
        f"  1. pass --data-dir DIR (data_dir=DIR) where DIR or DIR/{spec.name} holds those files;\n"
        f"  2. install the Debian package dataset-fashion-mnist (apt install dataset-fashion-mnist), "
        f"which provides {DEBIAN_DATASETS_DIR}/fashion-mnist/ (Fashion-MNIST only);\n"
        f"  3. go online: it is downloaded from {', '.join(spec.mirrors)} into {directory} "
        f"and checked against its MD5.\n"
        "Tried:\n  " + "\n  ".join(tried)
    )


def load_split(name: str, train: bool, data_dir: Optional[str] = None, download: bool = True,
               mirrors: Optional[Sequence[str]] = None, timeout: float = 30.0) -> Split:
    """Load one split of ``name`` ("mnist", "fashion-mnist" or "kmnist") as uint8 images + labels."""
    spec = _spec(name)
    split = "train" if train else "test"
    img_stem, lbl_stem = _FILES[(split, "images")], _FILES[(split, "labels")]
    paths, source = _locate(spec, [img_stem, lbl_stem], data_dir, download, mirrors, timeout)
    images = read_idx(paths[img_stem], expected_ndim=3)
    labels = read_idx(paths[lbl_stem], expected_ndim=1)
    if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
        raise ValueError(f"{source}: {spec.name} files must hold uint8, got {images.dtype} and {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{paths[img_stem]} has {images.shape[0]} images but {paths[lbl_stem]} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= len(spec.classes):
        raise ValueError(f"{paths[lbl_stem]}: label {int(labels.max())} out of range for {len(spec.classes)} classes")
    return Split(images, labels.long(), source)


def load(name: str, data_dir: Optional[str] = None, download: bool = True, **kwargs) -> Tuple[Split, Split]:
    """Both splits of ``name``: ``(train, test)``."""
    return (load_split(name, True, data_dir, download, **kwargs),
            load_split(name, False, data_dir, download, **kwargs))


def normalize(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W], scaled to [0, 1] then standardised with the
    dataset's training-set mean and std."""
    spec = _spec(name)
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    x = images.to(torch.float32).div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return x.sub_(spec.mean).div_(spec.std)
