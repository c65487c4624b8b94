"""Synthetic CIFAR-10 files in the real format, for the tests (no download, no real images).

The real ``cifar-10-python.tar.gz`` holds ``cifar-10-batches-py/`` with five pickled training
batches ``data_batch_1`` .. ``data_batch_5``, one ``test_batch`` and ``batches.meta``: each batch
a dict with ``b"data"`` (``uint8`` array ``(N, 3072)``: 1024 red values of a 32x32 image in row-major
order, then green, then blue), ``b"labels"`` (ints 0..9), ``b"batch_label"`` and
``b"filenames"``. The original files were written by Python 2 (``str`` keys pickled as
BINSTRING); ``py2=True`` reproduces that.
"""
from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

from iconv import data

__all__ = ["Py2StylePickler", "cifar_batch", "pickle_batch", "write_cifar_tarball"]


def cifar_batch(n: int, seed: int, label: str) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)],
    }


class Py2StylePickler(pickle._Pickler):
    """Pickles ``bytes`` and ``str`` as Python 2 ``str`` (BINSTRING opcodes), as the original files have them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def pickle_batch(batch: dict, py2: bool) -> bytes:
    if not py2:
        return pickle.dumps(batch, protocol=2)
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(batch)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_cifar_tarball(path: Path, sizes=(2, 3, 1, 2, 2), n_test=3, py2=False) -> dict:
    """A cifar-10-python.tar.gz in the real layout with a few random images per batch."""
    batches = {f"data_batch_{i + 1}": cifar_batch(n, i, f"training batch {i + 1} of 5") for i, n in enumerate(sizes)}
    batches["test_batch"] = cifar_batch(n_test, 99, "testing batch 1 of 1")
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            blob = pickle_batch(batch, py2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        meta = pickle.dumps({b"label_names": [n.encode() for n in data.CLASS_NAMES["cifar10"]]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return batches
