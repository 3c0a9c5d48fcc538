"""fastconv.data: the IDX reader, dataset lookup (data dir, Debian package, checksummed download)."""
import dataclasses
import gzip
import hashlib
import os
import re
import struct

import pytest
import torch

from fastconv import data

FASHION_DIR = os.path.join(data.DEBIAN_DATASETS_DIR, "fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="the Debian package dataset-fashion-mnist is not installed",
)


def _idx_bytes(arr: torch.Tensor, type_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, type_code, arr.dim()) + struct.pack(f">{arr.dim()}I", *arr.shape) + \
        arr.numpy().tobytes()


def _write_split(directory, split, n, seed=0, gz=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g)
    prefix = "train" if split == "train" else "t10k"
    ext = ".gz" if gz else ""
    os.makedirs(directory, exist_ok=True)
    data.write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    data.write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    return images, labels


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """Hide the Debian dataset directory so lookups fall through to the other sources."""
    monkeypatch.setattr(data, "DEBIAN_DATASETS_DIR", str(tmp_path / "no-debian"))


# ---------------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(5, 28, 28), (7,), (2, 3, 4, 5), (0, 28, 28)])
def test_idx_round_trip_uint8(tmp_path, compress, shape):
    t = torch.randint(0, 256, shape, dtype=torch.uint8)
    p = tmp_path / ("x.idx.gz" if compress else "x.idx")
    data.write_idx(str(p), t)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    out = data.read_idx(str(p))
    assert out.dtype == torch.uint8 and out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_idx_other_element_types_big_endian(tmp_path, dtype):
    t = (torch.arange(-6, 6).reshape(3, 4) * 3).to(dtype)
    p = tmp_path / "x.idx"
    data.write_idx(str(p), t)
    # The header and the elements are big-endian, as the format says.
    raw = p.read_bytes()
    assert raw[:4] == bytes([0, 0, {torch.int8: 9, torch.int16: 11, torch.int32: 12, torch.float32: 13,
                                    torch.float64: 14}[dtype], 2])
    assert struct.unpack(">2I", raw[4:12]) == (3, 4)
    out = data.read_idx(str(p))
    assert out.dtype == dtype and torch.equal(out, t)


def test_idx_matches_hand_written_header(tmp_path):
    t = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    p = tmp_path / "hand.idx"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + bytes(range(24)))
    assert torch.equal(data.read_idx(str(p), expected_ndim=3), t)


def test_gzip_detected_by_content_not_name(tmp_path):
    t = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    p = tmp_path / "images-idx3-ubyte"  # no .gz suffix
    p.write_bytes(gzip.compress(_idx_bytes(t)))
    assert torch.equal(data.read_idx(str(p)), t)


def _corrupt_cases():
    good = _idx_bytes(torch.zeros(4, 5, 5, dtype=torch.uint8))
    return {
        "empty": (b"", "too short for an IDX header"),
        "bad_magic": (b"\x12\x34\x08\x03" + good[4:], "bad IDX magic"),
        "bad_type": (b"\x00\x00\x07\x03" + good[4:], "bad IDX magic"),
        "zero_dims": (b"\x00\x00\x08\x00", "0 dimensions"),
        "short_header": (good[:9], "truncated IDX header"),
        "short_data": (good[:-1], "truncated"),
        "trailing": (good + b"\x00", "trailing bytes"),
        "wrong_dims": (_idx_bytes(torch.zeros(4, 25, dtype=torch.uint8)), "2 dimensions, expected 3"),
    }


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_idx_raises_value_error_naming_file(tmp_path, case, compress):
    payload, message = _corrupt_cases()[case]
    p = tmp_path / f"{case}-idx3-ubyte{'.gz' if compress else ''}"
    p.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ValueError, match=re.escape(str(p))) as info:
        data.read_idx(str(p), expected_ndim=3)
    assert message in str(info.value)


def test_bad_gzip_raises_value_error(tmp_path):
    good = gzip.compress(_idx_bytes(torch.zeros(10, 28, 28, dtype=torch.uint8)))
    for name, payload in {"truncated.gz": good[: len(good) // 2], "garbled.gz": good[:10] + b"\xff" * 40}.items():
        p = tmp_path / name
        p.write_bytes(payload)
        with pytest.raises(ValueError, match=re.escape(str(p)) + ".*gzip"):
            data.read_idx(str(p))


def test_gz_name_without_gzip_content(tmp_path):
    p = tmp_path / "x-idx1-ubyte.gz"
    p.write_bytes(_idx_bytes(torch.zeros(3, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=re.escape(str(p)) + ".*gzip magic"):
        data.read_idx(str(p))


# ---------------------------------------------------------------------------------- dataset lookup


@pytest.mark.parametrize("layout", ["flat", "subdir", "raw"])
def test_load_from_data_dir(tmp_path, no_debian, layout):
    d = tmp_path / "d"
    where = d / "mnist" if layout == "subdir" else d
    tr_img, tr_lbl = _write_split(str(where), "train", 12, seed=1, gz=layout != "raw")
    te_img, te_lbl = _write_split(str(where), "test", 5, seed=2, gz=layout != "raw")
    train, test = data.load("mnist", data_dir=str(d), download=False)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.equal(train.images, tr_img) and torch.equal(train.labels, tr_lbl.long())
    assert torch.equal(test.images, te_img) and torch.equal(test.labels, te_lbl.long())
    assert len(train) == 12 and train.source == str(where)


def test_mismatched_image_and_label_counts(tmp_path, no_debian):
    _write_split(str(tmp_path), "train", 6)
    data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        data.load_split("mnist", True, data_dir=str(tmp_path), download=False)


def test_label_out_of_range(tmp_path, no_debian):
    _write_split(str(tmp_path), "test", 4)
    data.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), torch.tensor([0, 1, 10, 2], dtype=torch.uint8))
    with pytest.raises(ValueError, match="label 10 out of range"):
        data.load_split("mnist", False, data_dir=str(tmp_path), download=False)


def test_not_found_error_names_three_ways(tmp_path, no_debian):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_split("mnist", True, data_dir=str(tmp_path / "empty"), download=False)
    msg = str(info.value)
    assert "--data-dir" in msg
    assert "dataset-fashion-mnist" in msg
    assert "ossci-datasets.s3.amazonaws.com" in msg and "MD5" in msg


def _serve_dir(tmp_path, name):
    """A 'mirror' as a file:// URL holding tiny gzipped IDX files; returns (url, md5 per file)."""
    mirror = tmp_path / "mirror"
    _write_split(str(mirror), "train", 8, seed=3)
    _write_split(str(mirror), "test", 4, seed=4)
    md5 = {f: hashlib.md5((mirror / f).read_bytes()).hexdigest() for f in os.listdir(mirror)}
    return mirror.as_uri() + "/", md5


def test_download_verifies_md5(tmp_path, no_debian, monkeypatch):
    url, md5 = _serve_dir(tmp_path, "mnist")
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], md5=md5))
    dest = tmp_path / "cache"
    # A dead mirror first: the loader goes on to the next one.
    split = data.load_split("mnist", True, data_dir=str(dest), mirrors=[(tmp_path / "dead").as_uri() + "/", url])
    assert len(split) == 8 and split.source == str(dest / "mnist")
    assert sorted(os.listdir(dest / "mnist")) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_download_rejects_bad_checksum(tmp_path, no_debian, monkeypatch):
    url, md5 = _serve_dir(tmp_path, "mnist")
    bad = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(data.DATASETS, "mnist", dataclasses.replace(data.DATASETS["mnist"], md5=bad))
    dest = tmp_path / "cache"
    with pytest.raises(data.DatasetNotFoundError, match="does not match the published"):
        data.load_split("mnist", True, data_dir=str(dest), mirrors=[url])
    # Nothing unverified is left behind.
    assert not (dest / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert not [f for f in os.listdir(dest / "mnist") if f.endswith(".part")]


def test_mirrors_are_the_usual_ones():
    assert data.DATASETS["mnist"].mirrors[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    assert any("yann.lecun.com" in m for m in data.DATASETS["mnist"].mirrors)
    for spec in data.DATASETS.values():
        assert len(spec.md5) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", v) for v in spec.md5.values())


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_split("cifar", True)


# ---------------------------------------------------------------------------------- normalisation


def test_normalize():
    imgs = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    x = data.normalize(imgs, "mnist")
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081]))
    with pytest.raises(TypeError):
        data.normalize(imgs.float(), "mnist")


@needs_fashion
def test_fashion_mnist_from_debian_package():
    train, test = data.load("fashion-mnist", download=False)
    assert train.source == FASHION_DIR
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    # The normalisation constants are this training set's statistics.
    x = data.normalize(train.images, "fashion-mnist")
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
