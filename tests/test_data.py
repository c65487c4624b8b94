"""Tests of iconv.data: idx parsing, the loaders, CIFAR-10 parsing, downloads, dequantization, batches."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from iconv import data
from tests.cifar_files import cifar_batch, write_cifar_tarball

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- idx helpers

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding of ``arr``, written by hand: magic 00 00 type ndim, big-endian dims and data."""
    code = IDX_CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    raw = idx_bytes(arr)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    if dtype == np.int32:
        arr[0, 0, 0], arr[0, 0, 1] = np.iinfo(np.int32).max, np.iinfo(np.int32).min  # byte order matters
    out = data.read_idx(write_idx(tmp_path / "a.idx", arr, gz=gz))
    assert out.dtype == getattr(torch, np.dtype(dtype).name)
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out.numpy(), arr)


def test_read_idx_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = data.read_idx(write_idx(tmp_path / "plain-name-ubyte", arr, gz=True))
    np.testing.assert_array_equal(out.numpy(), arr)


def test_read_idx_int32_big_endian(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">ii", 1, -2))
    assert data.read_idx(path).tolist() == [1, -2]


def test_read_idx_result_is_writable(tmp_path):
    out = data.read_idx(write_idx(tmp_path / "a", np.zeros((2, 2), np.uint8)))
    out += 1
    assert out.sum() == 4


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic number 0x01020801"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown idx type code 0x07"),
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated idx header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x01", r"shape \(5,\).*holds 2 bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "holds 2 bytes"),
    ],
)
def test_read_idx_malformed(tmp_path, raw, match):
    path = tmp_path / "bad"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        data.read_idx(path)
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match=match):
        data.read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-10])
    with pytest.raises(ValueError, match="corrupt gzip"):
        data.read_idx(path)


# --------------------------------------------------------------------------- Fashion-MNIST


def write_fake_fashion(directory: Path, n: int = 3, gz: bool = True, split_stems=("t10k",)) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    for stem in split_stems:
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(directory / f"{stem}-labels-idx1-ubyte{suffix}", labels, gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_root(tmp_path, gz):
    images, labels = write_fake_fashion(tmp_path, gz=gz)
    x, y = data.load_fashion_mnist("test", root=tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (3, 1, 28, 28)
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_fashion_mnist_env_var_subdirectory(tmp_path, monkeypatch):
    images, _ = write_fake_fashion(tmp_path / "fashion-mnist", n=2)
    monkeypatch.setenv("ICONV_DATA", str(tmp_path))
    x, _ = data.load_fashion_mnist("test")
    np.testing.assert_array_equal(x[:, 0].numpy(), images)  # the env dir wins over the Debian one


def test_fashion_mnist_missing_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        data.load_fashion_mnist("train", root=tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value) and "ICONV_DATA" in str(info.value)


def test_fashion_mnist_rejects_mismatched_files(tmp_path):
    write_fake_fashion(tmp_path, n=3)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8), gz=True)
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        data.load_fashion_mnist("test", root=tmp_path)


def test_bad_split_names(tmp_path):
    for loader in (data.load_fashion_mnist, data.load_digits, data.load_cifar10):
        with pytest.raises(ValueError, match="split must be one of"):
            loader("validation")
    with pytest.raises(ValueError, match="split must be one of"):
        data.read_cifar10_batches(tmp_path, "Train")


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason=f"{DEBIAN_DIR} absent (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_real_files(split, n, monkeypatch, tmp_path):
    monkeypatch.setenv("ICONV_DATA", str(tmp_path))  # empty: forces the Debian directory
    x, y = data.load_fashion_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y).tolist() == [n // 10] * 10  # Fashion-MNIST is exactly balanced
    assert int(x.max()) == 255 and int(x.min()) == 0


# --------------------------------------------------------------------------- digits


def test_digits():
    pytest.importorskip("sklearn")
    xtr, ytr = data.load_digits("train")
    xte, yte = data.load_digits("test")
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == xte.dtype == torch.uint8 and ytr.dtype == torch.int64
    both = torch.cat([xtr, xte])
    assert int(both.min()) == 0 and int(both.max()) == 255
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(xte[:, 0].numpy(), np.rint(raw[1437:] * 255 / 16).astype(np.uint8))
    assert torch.equal(data.load_digits("train")[0], xtr)  # deterministic


def test_load_dispatcher(tmp_path):
    pytest.importorskip("sklearn")
    x, _ = data.load("Digits", "test")
    assert x.shape == (360, 1, 8, 8)
    write_fake_fashion(tmp_path)
    assert data.load("fashion_mnist", "test", root=tmp_path)[0].shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        data.load("mnist")
    assert set(data.IMAGE_SHAPES) == set(data.CLASS_NAMES) == {"fashion-mnist", "digits", "cifar10"}


# --------------------------------------------------------------------------- CIFAR-10 parser


@pytest.mark.parametrize("py2", [False, True])
def test_cifar10_tarball_round_trip(tmp_path, py2):
    batches = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", py2=py2)
    x, y = data.read_cifar10_batches(tmp_path / "cifar-10-python.tar.gz", "train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    rows = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert y.tolist() == labels
    np.testing.assert_array_equal(x.reshape(10, -1).numpy(), rows)
    # channel order: 1024 red values (row-major 32x32), then green, then blue
    r = rows[4]
    assert x[4, 0, 0, 0] == r[0] and x[4, 0, 0, 1] == r[1] and x[4, 0, 1, 0] == r[32]
    assert x[4, 1, 0, 0] == r[1024] and x[4, 2, 31, 31] == r[3071]
    xt, yt = data.read_cifar10_batches(tmp_path / "cifar-10-python.tar.gz", "test")
    np.testing.assert_array_equal(xt.reshape(3, -1).numpy(), batches["test_batch"][b"data"])
    assert yt.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_directory_and_load(tmp_path, monkeypatch):
    write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "_torchvision_datasets", lambda: None)
    x_tar, y_tar = data.load_cifar10("train", root=tmp_path)  # from the tarball
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.11.4: no filters
        tar.extractall(tmp_path, **kwargs)
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    x_dir, y_dir = data.load_cifar10("train", root=tmp_path)  # from cifar-10-batches-py/
    assert torch.equal(x_tar, x_dir) and torch.equal(y_tar, y_dir)
    assert torch.equal(data.read_cifar10_batches(tmp_path / "cifar-10-batches-py", "test")[0],
                       data.load("cifar-10", "test", root=tmp_path)[0])


def test_cifar10_missing_batch(tmp_path):
    path = tmp_path / "c.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        blob = pickle.dumps(cifar_batch(1, 0, "x"), protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(ValueError, match="lacks the CIFAR-10 batch files.*data_batch_2"):
        data.read_cifar10_batches(path, "train")


def test_cifar10_refuses_foreign_pickle(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Path("x")}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        data.read_cifar10_batches(tmp_path, "test")


def test_cifar10_bad_data_shape(tmp_path):
    batch = cifar_batch(2, 0, "x")
    batch[b"data"] = batch[b"data"][:, :100]
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"uint8 \(N, 3072\)"):
        data.read_cifar10_batches(tmp_path, "test")


def test_cifar10_missing_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_torchvision_datasets", lambda: None)
    with pytest.raises(FileNotFoundError, match="download=True.*cifar-10-python.tar.gz"):
        data.load_cifar10("test", root=tmp_path)


def test_cifar10_torchvision_path_channel_order(tmp_path, monkeypatch):
    hwc = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            assert root == str(tmp_path) and train is False and download is False
            self.data, self.targets = hwc, [3, 7]

    monkeypatch.setattr(data, "_torchvision_datasets", lambda: type("tv", (), {"CIFAR10": FakeCIFAR10}))
    x, y = data.load_cifar10("test", root=tmp_path)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 7]
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), hwc)


# --------------------------------------------------------------------------- downloads (file:// URLs, offline)


def test_download_file_checks_md5_and_is_atomic(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"some payload" * 1000)
    good = hashlib.md5(src.read_bytes()).hexdigest()
    dest_dir = tmp_path / "dl"
    with pytest.raises(data.ChecksumError, match="md5 mismatch"):
        data.download_file(src.as_uri(), dest_dir / "f.bin", "0" * 32, progress=False)
    assert list(dest_dir.iterdir()) == []  # no partial or temporary file left
    out = data.download_file(src.as_uri(), dest_dir / "f.bin", good, progress=False)
    assert out.read_bytes() == src.read_bytes() and data.file_md5(out) == good
    assert [p.name for p in dest_dir.iterdir()] == ["f.bin"]
    src.unlink()  # a second call does not download again
    assert data.download_file(src.as_uri(), dest_dir / "f.bin", good, progress=False) == out


def test_download_file_unreachable(tmp_path):
    with pytest.raises(ConnectionError, match="could not download.*copy it to"):
        data.download_file((tmp_path / "nope").as_uri(), tmp_path / "dl" / "f", "0" * 32, progress=False)
    assert list((tmp_path / "dl").iterdir()) == []


def test_cifar10_download_uses_official_md5(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tar.gz"
    write_cifar_tarball(fake)
    monkeypatch.setattr(data, "_torchvision_datasets", lambda: None)
    monkeypatch.setattr(data, "CIFAR10_URL", fake.as_uri())
    with pytest.raises(data.ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
        data.load_cifar10("test", root=tmp_path / "root", download=True)
    assert not (tmp_path / "root" / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(data, "CIFAR10_MD5", data.file_md5(fake))
    x, _ = data.load_cifar10("test", root=tmp_path / "root", download=True)
    assert x.shape == (3, 3, 32, 32) and (tmp_path / "root" / "cifar-10-python.tar.gz").is_file()


def test_fashion_mnist_download(tmp_path, monkeypatch):
    src = tmp_path / "src"
    images, labels = write_fake_fashion(src, n=4, split_stems=("train", "t10k"))
    monkeypatch.setattr(data, "FASHION_MNIST_URL", src.as_uri() + "/")
    monkeypatch.setattr(data, "FASHION_MNIST_MD5", {p.name: data.file_md5(p) for p in src.iterdir()})
    x, y = data.load_fashion_mnist("train", root=tmp_path / "root", download=True)
    np.testing.assert_array_equal(x[:, 0].numpy(), images)
    assert (tmp_path / "root" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()


# --------------------------------------------------------------------------- dequantize, pad_to, batches


def test_dequantize_range_and_mean():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = data.dequantize(x, generator=torch.Generator().manual_seed(1))
    assert y.dtype == torch.float32 and y.shape == x.shape
    # stays in its bin (float32 rounding of x + u may land on the upper edge, never beyond)
    assert bool(((y >= x.float() / 256) & (y <= (x.float() + 1) / 256)).all())
    noise = y * 256 - x.float()
    assert abs(noise.mean().item() - 0.5) < 0.01 and abs(noise.var().item() - 1 / 12) < 0.01


def test_dequantize_never_reaches_one():
    # in float32, 255 + u rounds to 256 for u close to 1: 3 of these 10**6 draws without the clamp
    y = data.dequantize(torch.full((10**6,), 255, dtype=torch.uint8), generator=torch.Generator().manual_seed(0))
    assert float(y.max()) < 1.0 and float(y.min()) >= 255 / 256
    assert float(data.dequantize(torch.zeros(10, dtype=torch.uint8)).min()) >= 0.0


def test_dequantize_reproducible_and_typed():
    x = torch.arange(256, dtype=torch.uint8)
    a = data.dequantize(x, torch.Generator().manual_seed(3), dtype=torch.float64)
    b = data.dequantize(x, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    with pytest.raises(TypeError, match="uint8"):
        data.dequantize(x.float())
    with pytest.raises(TypeError, match="floating"):
        data.dequantize(x, dtype=torch.int32)


def test_pad_to():
    x = torch.full((2, 1, 28, 28), 7, dtype=torch.uint8)
    y = data.pad_to(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.dtype == torch.uint8
    assert torch.equal(y[..., 2:30, 2:30], x) and int(y.sum()) == int(x.sum())
    assert data.pad_to(x, (29, 31)).shape == (2, 1, 29, 31)
    with pytest.raises(ValueError, match="smaller"):
        data.pad_to(x, 16)


def test_batches_cover_everything_once():
    x = torch.arange(10).reshape(10, 1, 1, 1).to(torch.uint8)
    y = torch.arange(10)
    loader = data.batches(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    got = list(loader)
    assert [len(b[1]) for b in got] == [4, 4, 2]
    seen = torch.cat([b[1] for b in got])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(bx.flatten().long(), by) for bx, by in got)  # images stay with their labels
    second = torch.cat([b[1] for b in loader])
    assert second.tolist() != seen.tolist()  # a fresh permutation each epoch


def test_batches_seeded_drop_last_and_unlabelled():
    x = torch.arange(10).reshape(10, 1)
    run = lambda: [b.flatten().tolist() for b in data.batches(x, None, 3, True, torch.Generator().manual_seed(5), True)]
    assert run() == run() and len(run()) == 3 and all(len(b) == 3 for b in run())
    plain = list(data.ImageBatches(x, batch_size=4))
    assert [b.flatten().tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(x, batch_size=0)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        data.batches(x, torch.arange(9))


# --------------------------------------------------------------------------- classifier inputs and image checks


def test_prepare_images():
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = data.prepare_images(images)
    assert x.dtype == torch.float32 and x.min() >= -2 and x.max() <= 2
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)
    assert data.prepare_images(images, like=torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert data.prepare_images(images, like=torch.nn.Linear(1, 1).double()).dtype == torch.float64
    floats = images.double() / 255  # floating input: already in [0, 1], only normalised
    torch.testing.assert_close(data.prepare_images(floats, like=floats), (floats - 0.5) / 0.25)
    with pytest.raises(TypeError, match="uint8"):
        data.prepare_images(images.long())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        data.prepare_images(images[0])


def test_augment_images_flips_and_shifts():
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    flipped = data.augment_images(images, flip=True, crop=0, generator=torch.Generator().manual_seed(1))
    kinds = [torch.equal(a, b) for a, b in zip(flipped, images)]
    for a, b in zip(flipped, images):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    assert 0 < sum(kinds) < len(kinds)  # some flipped, some not (seeded)
    cropped = data.augment_images(images, flip=False, crop=2, generator=torch.Generator().manual_seed(2))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    for a, b in zip(cropped, images):  # a shifted copy: some window of the zero-padded image
        padded = torch.nn.functional.pad(b, (2, 2, 2, 2))
        assert any(torch.equal(a, padded[:, i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
    assert torch.equal(data.augment_images(images, flip=False, crop=0), images)


def test_check_image_shape():
    assert data.check_image_shape([1, 28, 28]) == (1, 28, 28)
    for bad in [(28, 28), (1, 0, 4), (1, 2.5, 4), "abc", None]:
        with pytest.raises(ValueError, match="shape must be"):
            data.check_image_shape(bad)


def test_check_uint8_images():
    data.check_uint8_images(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), (1, 4, 4))
    with pytest.raises(TypeError, match="uint8 pixel values"):
        data.check_uint8_images(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        data.check_uint8_images([[0]])
    with pytest.raises(ValueError, match=r"expected \(B, 1, 4, 4\)"):
        data.check_uint8_images(torch.zeros(2, 1, 4, 5, dtype=torch.uint8), (1, 4, 4))
    with pytest.raises(ValueError, match=r"expected \(B, C, H, W\)"):
        data.check_uint8_images(torch.zeros(1, 4, 4, dtype=torch.uint8))
