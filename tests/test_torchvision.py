"""The data path that uses torchvision when it is installed (as in Colab).

Skipped without torchvision; the compatibility job (.ci/compat.sh) installs torch with its matching
torchvision, so there these tests run. ``iconv.data.load_cifar10`` tries torchvision's ``CIFAR10``
first and falls back to its own reader (:func:`iconv.data.read_cifar10_batches`), which serves as
the independent reference here. torchvision's own code runs unmodified: the fake batch files are
declared to it through its public class attributes (file names and MD5 sums), so its integrity
check passes exactly as with the real files.
"""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from iconv import data

torchvision = pytest.importorskip("torchvision")
from torchvision import datasets  # noqa: E402  (after the skip)

SIZES = {"data_batch_1": 3, "data_batch_2": 2, "data_batch_3": 1, "data_batch_4": 2, "data_batch_5": 2,
         "test_batch": 4}


def write_batches(root):
    """A cifar-10-batches-py folder with a few random images per batch (Python 3 pickles, str keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in SIZES.items():
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(data.CLASS_NAMES["cifar10"])}, protocol=2))
    return folder


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """The fake files, declared to torchvision with their own MD5 sums; records every CIFAR10 construction."""
    folder = write_batches(tmp_path)
    real = datasets.CIFAR10
    monkeypatch.setattr(real, "train_list", [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(real, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(real, "meta", {"filename": "batches.meta", "key": "label_names",
                                       "md5": md5(folder / "batches.meta")})
    calls = []

    class Recorded(real):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(datasets, "CIFAR10", Recorded)
    return tmp_path, folder, calls


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_through_torchvision_matches_the_reader(cifar_root, split):
    root, folder, calls = cifar_root
    x, y = data.load_cifar10(split, root=root)
    assert calls == [{"train": split == "train", "download": False}]  # torchvision's loader did the work
    expected_x, expected_y = data.read_cifar10_batches(folder, split)
    n = sum(v for k, v in SIZES.items() if (k == "test_batch") == (split == "test"))
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)  # channel order, image order, labels


def test_cifar10_falls_back_to_the_reader_when_torchvision_refuses(tmp_path):
    """Unregistered files fail torchvision's MD5 check: the reader takes over and gives the same images."""
    folder = write_batches(tmp_path)
    x, y = data.load_cifar10("test", root=tmp_path)
    expected_x, expected_y = data.read_cifar10_batches(folder, "test")
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)


def test_torchvision_is_built_for_this_torch():
    """Its compiled operators load and run with the installed torch (a mismatched pair fails here)."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.1, 0.1, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
