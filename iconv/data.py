"""Image data sets as plain ``uint8`` tensors, offline first.

Every loader returns ``(images, labels)``: ``images`` is a ``uint8`` tensor of
shape ``(N, C, H, W)`` with values 0..255, ``labels`` an ``int64`` tensor of
shape ``(N,)``.  Turn images into flow inputs with :func:`dequantize`, and
iterate over them with :func:`batches`.

Where the files are looked for
------------------------------
``root`` argument if given, otherwise the directory in the environment
variable ``ICONV_DATA``, otherwise ``~/.cache/iconv`` (:func:`data_root`).

* Fashion-MNIST: the four idx files (``.gz`` or not) in ``<root>``,
  ``<root>/fashion-mnist`` or ``<root>/FashionMNIST/raw`` (torchvision's
  layout); without an explicit ``root`` also in
  ``/usr/share/datasets/fashion-mnist`` (Debian package
  ``dataset-fashion-mnist``).
* CIFAR-10: ``<root>/cifar-10-batches-py/`` or ``<root>/cifar-10-python.tar.gz``
  (the same layout torchvision uses).
* digits: scikit-learn ships them, nothing to find.

Nothing is downloaded unless ``download=True``; downloads are checked against
the publishers' MD5 checksums and written atomically (temporary file, then
rename), so an interrupted download never leaves a half file behind.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SHAPES",
    "ChecksumError",
    "ImageBatches",
    "batches",
    "data_root",
    "dequantize",
    "download_file",
    "download_fashion_mnist",
    "file_md5",
    "load",
    "load_cifar10",
    "load_digits",
    "load_fashion_mnist",
    "pad_to",
    "read_cifar10_batches",
    "read_idx",
]

SPLITS = ("train", "test")

IMAGE_SHAPES = {
    "fashion-mnist": (1, 28, 28),
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
}
"""``(C, H, W)`` of the images each loader returns."""

CLASS_NAMES = {
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
    "digits": tuple(str(d) for d in range(10)),
    "cifar10": (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
}
"""Label ``k`` of data set ``name`` means ``CLASS_NAMES[name][k]``."""

ENV_VAR = "ICONV_DATA"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# MD5 of the upstream .gz files (Zalando's README).  Debian recompresses them,
# so the files of ``dataset-fashion-mnist`` have other checksums; local files
# are therefore never checked against these, only downloads are.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

DIGITS_TRAIN_FRACTION = 0.8


class ChecksumError(OSError):
    """A downloaded file does not have the published MD5 checksum."""


# --------------------------------------------------------------------------- helpers


def data_root() -> Path:
    """Default data directory: ``$ICONV_DATA`` if set, else ``~/.cache/iconv``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "iconv"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def file_md5(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    h = hashlib.new("md5", usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except Exception:  # tqdm is a dependency, but a progress bar is never essential
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` once, verifying its MD5; return ``dest``.

    Does nothing if ``dest`` already exists.  The data go to a temporary file
    in ``dest``'s directory that is renamed to ``dest`` only after the
    checksum matched, so ``dest`` is either complete and verified or absent.

    Raises:
        ConnectionError: the URL could not be fetched (offline, no such host,
            HTTP error); the message says where to put the file by hand.
        ChecksumError: the data downloaded do not have checksum ``md5``.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, dest, timeout, progress)
        if digest != md5:
            raise ChecksumError(
                f"md5 mismatch for {url}: got {digest}, expected {md5}; the download is corrupt "
                f"or not the official file, nothing was written to {dest}"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _stream(url: str, out, dest: Path, timeout: float, progress: bool) -> str:
    """Copy ``url`` into the open binary file ``out`` in 1 MiB chunks; return the MD5 of the data."""
    h = hashlib.new("md5", usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            bar = _progress_bar(int(length) if length else None, dest.name, progress)
            try:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
        raise ConnectionError(
            f"could not download {url} ({err}). If this machine is offline, download it "
            f"elsewhere and copy it to {dest}"
        ) from err
    return h.hexdigest()


# --------------------------------------------------------------------------- idx files

# dtype code of the idx format -> (big-endian numpy dtype, torch dtype)
_IDX_DTYPES = {
    0x08: (np.dtype(">u1"), torch.uint8),
    0x09: (np.dtype(">i1"), torch.int8),
    0x0B: (np.dtype(">i2"), torch.int16),
    0x0C: (np.dtype(">i4"), torch.int32),
    0x0D: (np.dtype(">f4"), torch.float32),
    0x0E: (np.dtype(">f8"), torch.float64),
}


def _read_maybe_gzip(path: Path) -> bytearray:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return bytearray(raw)
    try:
        return bytearray(gzip.decompress(raw))
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err})") from err


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    Format: a 4-byte magic number ``00 00 TT NN`` (``TT`` the element type:
    0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64;
    ``NN`` the number of dimensions), then ``NN`` big-endian uint32 sizes, then
    the elements, big-endian, row-major.  Gzip compression is recognised by
    its magic bytes, not by the file name.

    Returns:
        A tensor of the stored shape and the matching torch dtype (native
        byte order).

    Raises:
        ValueError: the file is not a well-formed idx file (bad magic number,
            unknown type code, truncated header, or a data size that does not
            match the header).
    """
    path = Path(path)
    buf = _read_maybe_gzip(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: not an idx file: {len(buf)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(buf[:4], "big")
    if buf[0] != 0 or buf[1] != 0:
        raise ValueError(
            f"{path}: not an idx file: magic number 0x{magic:08X} does not start with two zero bytes"
        )
    code, ndim = buf[2], buf[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown idx type code 0x{code:02X} in magic 0x{magic:08X} (known: {known})")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated idx header: {ndim} dimensions need {header} bytes, file has {len(buf)}")
    dims = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    np_dtype, torch_dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if len(buf) - header != expected:
        raise ValueError(
            f"{path}: idx header says shape {dims} of {np_dtype.name} ({expected} bytes of data), "
            f"but the file holds {len(buf) - header} bytes after the header (truncated or not an idx file)"
        )
    arr = np.frombuffer(buf, dtype=np_dtype, offset=header).reshape(dims)
    arr = arr.astype(np_dtype.newbyteorder("="), copy=False)  # buf is a bytearray: writable
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------- Fashion-MNIST


def _fashion_dirs(root: str | os.PathLike | None) -> list[Path]:
    base = Path(root).expanduser() if root is not None else data_root()
    dirs = [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]
    if root is None:
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_fashion_split(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    stems = FASHION_MNIST_FILES[split]
    for d in dirs:
        found = [_find_idx(d, s) for s in stems]
        if all(found):
            return found[0], found[1]
    return None


def _fashion_missing_message(dirs: list[Path], split: str) -> str:
    stems = FASHION_MNIST_FILES[split]
    where = ", ".join(str(d) for d in dirs)
    return (
        f"Fashion-MNIST {split} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found; looked in: {where}. "
        f"Get them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs "
        f"{DEBIAN_FASHION_MNIST_DIR}), or put the four idx files from "
        f"https://github.com/zalandoresearch/fashion-mnist into a directory and pass root=... or set "
        f"${ENV_VAR}, or call load_fashion_mnist(..., download=True)."
    )


def download_fashion_mnist(root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files (MD5-checked) to ``<root>/fashion-mnist``.

    ``root`` defaults to :func:`data_root`.  Files already there are kept.
    Returns the directory.
    """
    target = (Path(root).expanduser() if root is not None else data_root()) / "fashion-mnist"
    for name, md5 in FASHION_MNIST_MD5.items():
        download_file(FASHION_MNIST_URL + name, target / name, md5, progress=progress)
    return target


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST: ``uint8`` images ``(N, 1, 28, 28)`` and ``int64`` labels 0..9.

    N is 60000 for ``split="train"``, 10000 for ``"test"``.  Looks for the idx
    files (see the module docstring for where); with ``download=True``
    missing files are fetched by :func:`download_fashion_mnist`.

    Raises:
        FileNotFoundError: the files are not there (and ``download`` is
            false); the message says how to get them.
        ValueError: a bad ``split``, or files that are not Fashion-MNIST.
    """
    split = _check_split(split)
    dirs = _fashion_dirs(root)
    found = _find_fashion_split(dirs, split)
    if found is None:
        if not download:
            raise FileNotFoundError(_fashion_missing_message(dirs, split))
        found = _find_fashion_split([download_fashion_mnist(root)], split)
        assert found is not None
    image_path, label_path = found
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"{image_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise ValueError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise ValueError(f"{label_path}: labels must be 0..9, found {int(labels.max())}")
    return images.unsqueeze(1).contiguous(), labels.long()


# --------------------------------------------------------------------------- digits


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits: ``uint8`` images ``(N, 1, 8, 8)``, labels 0..9.

    The original grey levels 0..16 are rescaled to 0..255 by
    ``round(v * 255 / 16)`` (so 0 -> 0 and 16 -> 255).

    Split (deterministic, no randomness): of the 1797 images in scikit-learn's
    order, the first ``floor(0.8 * 1797) = 1437`` are ``"train"`` and the last
    360 are ``"test"``.  The images come in writer order, so the test digits
    are by writers not seen in training; classes are near balanced in both.

    Needs scikit-learn (``pip install scikit-learn``).
    """
    split = _check_split(split)
    try:
        from sklearn.datasets import load_digits as _sklearn_load_digits
    except ImportError as err:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from err
    bunch = _sklearn_load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    n_train = int(DIGITS_TRAIN_FRACTION * len(images))
    part = slice(0, n_train) if split == "train" else slice(n_train, None)
    x = torch.from_numpy(np.ascontiguousarray(images[part])).unsqueeze(1)
    return x, torch.from_numpy(np.ascontiguousarray(labels[part]))


# --------------------------------------------------------------------------- CIFAR-10

# The only globals a CIFAR-10 batch pickle needs: numpy arrays and dtypes,
# and _codecs.encode (how Python 3 writes bytes at protocol 2).  Anything
# else is refused, so a tampered file cannot run code when unpickled.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not something a CIFAR-10 batch file contains"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2: avoid the deprecated alias
        return super().find_class(module, name)


def _parse_cifar_batch(blob: bytes, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> ``uint8 (N, 3, 32, 32)`` images and ``int64 (N,)`` labels."""
    try:
        # latin1: Python 2 ``str`` (the original files) arrive as str, which
        # numpy needs for its array state; Python 3 bytes stay bytes.
        batch = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as err:
        raise ValueError(f"CIFAR-10 batch {name!r} could not be unpickled: {err}") from err
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR-10 batch {name!r}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = {"data", "labels"} - batch.keys()
    if missing:
        raise ValueError(f"CIFAR-10 batch {name!r} lacks the keys {sorted(missing)} (has {sorted(map(str, batch))})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"CIFAR-10 batch {name!r}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"CIFAR-10 batch {name!r}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch {name!r}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    # each row: 1024 red values, then 1024 green, then 1024 blue, each plane row-major 32x32
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.copy())


def _read_batch_blobs(source: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    if source.is_dir():
        directory = source / CIFAR10_DIR if (source / CIFAR10_DIR).is_dir() else source
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks the CIFAR-10 batch files {missing}")
        return {n: (directory / n).read_bytes() for n in names}
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or directory")
    if not tarfile.is_tarfile(source):
        raise ValueError(f"{source}: neither a directory nor a tar archive (expected {CIFAR10_TARBALL})")
    blobs: dict[str, bytes] = {}
    with tarfile.open(source, "r:*") as tar:
        for member in tar:  # one streaming pass: seeking back in a .gz means decompressing again
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in names and base not in blobs:
                blobs[base] = tar.extractfile(member).read()
    missing = [n for n in names if n not in blobs]
    if missing:
        raise ValueError(f"{source}: the archive lacks the CIFAR-10 batch files {missing}")
    return blobs


def read_cifar10_batches(
    source: str | os.PathLike, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse CIFAR-10's python-version batches into ``uint8 (N, 3, 32, 32)`` and ``int64 (N,)``.

    Args:
        source: ``cifar-10-python.tar.gz`` (any tar archive holding the batch
            files), the ``cifar-10-batches-py`` directory, or its parent.
        split: ``"train"`` reads ``data_batch_1`` .. ``data_batch_5`` in that
            order and concatenates them; ``"test"`` reads ``test_batch``.

    Each batch is a pickled dict (protocol 2, as written by Python 2) with
    ``b"data"``, a ``uint8`` array ``(N, 3072)`` whose rows hold the red plane
    (1024 values, row-major 32x32), then green, then blue, and ``b"labels"``,
    a list of N ints 0..9 (also ``b"batch_label"``, ``b"filenames"``, unused).
    Unpickling allows only numpy arrays, so untrusted files cannot run code.
    """
    split = _check_split(split)
    names = CIFAR10_BATCHES[split]
    blobs = _read_batch_blobs(Path(source).expanduser(), names)
    parts = [_parse_cifar_batch(blobs[n], n) for n in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _find_cifar10(root: Path) -> Path | None:
    directory = root / CIFAR10_DIR
    names = CIFAR10_BATCHES["train"] + CIFAR10_BATCHES["test"]
    if all((directory / n).is_file() for n in names):
        return directory
    if (root / CIFAR10_TARBALL).is_file():
        return root / CIFAR10_TARBALL
    return None


def _torchvision_datasets():
    """``torchvision.datasets`` if importable, else ``None`` (torchvision is never required)."""
    try:
        import torchvision.datasets as datasets
    except Exception:  # not installed, or a build that does not match torch
        return None
    return datasets


def load_cifar10(
    split: str = "train", root: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10: ``uint8`` images ``(N, 3, 32, 32)`` (RGB) and ``int64`` labels 0..9.

    N is 50000 for ``split="train"``, 10000 for ``"test"``.  ``root`` defaults
    to :func:`data_root`.  Order of attempts:

    1. torchvision's ``CIFAR10(root, download=download)`` when torchvision is
       importable (it reads ``<root>/cifar-10-batches-py``);
    2. otherwise, or if that fails, :func:`read_cifar10_batches` on
       ``<root>/cifar-10-batches-py`` or ``<root>/cifar-10-python.tar.gz``;
    3. if neither is there and ``download`` is true, the official tarball is
       downloaded once to ``<root>/cifar-10-python.tar.gz`` (MD5-checked,
       atomic) and parsed.

    Raises:
        FileNotFoundError: no data and ``download`` is false; the message
            says how to get them.
        ConnectionError: ``download=True`` but the download failed.
        ChecksumError: the downloaded file has the wrong MD5.
    """
    split = _check_split(split)
    root = Path(root).expanduser() if root is not None else data_root()
    datasets = _torchvision_datasets()
    if datasets is not None:
        try:
            ds = datasets.CIFAR10(str(root), train=(split == "train"), download=download)
            images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous()
            return images, torch.as_tensor(ds.targets, dtype=torch.int64)
        except (RuntimeError, OSError):
            pass  # missing or offline: the reader below finds a tarball or explains what to do
    source = _find_cifar10(root)
    if source is None:
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found in {root} (looked for {CIFAR10_DIR}/ and {CIFAR10_TARBALL}). "
                f"Call load_cifar10(..., download=True), or download {CIFAR10_URL} "
                f"(md5 {CIFAR10_MD5}) and put it in {root} (or pass root=..., or set ${ENV_VAR})."
            )
        source = download_file(CIFAR10_URL, root / CIFAR10_TARBALL, CIFAR10_MD5)
    return read_cifar10_batches(source, split)


# --------------------------------------------------------------------------- dispatcher

_LOADERS = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
    "cifar10": load_cifar10,
}


def _canonical_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    for canonical in _LOADERS:
        if canonical.replace("-", "") == key:
            return canonical
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(_LOADERS)}")


def load(name: str, split: str = "train", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Load data set ``name`` ("fashion-mnist", "digits" or "cifar10"; case, "-" and "_" ignored).

    Extra keyword arguments (``root``, ``download``) go to the loader.
    """
    return _LOADERS[_canonical_name(name)](split, **kwargs)


# --------------------------------------------------------------------------- using the images


def dequantize(
    x: torch.Tensor, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform dequantization: ``y = (x + u) / 256`` with ``u ~ U[0, 1)``, so ``y`` lies in ``[0, 1)``.

    A flow is a density on continuous ``y``; fitting it to ``x`` plus uniform
    noise makes its likelihood a lower bound on a discrete model of the 256
    grey levels.  For an image of ``D = C*H*W`` values:

        bits/dim(x) <= E_u[-log p(y)] / (D ln 2) + 8

    where ``p`` is the flow's density of ``y`` in the unit cube (the ``+ 8 =
    log2 256`` accounts for scaling the cubes of side 1/256 to unit volume).

    Args:
        x: ``uint8`` tensor of any shape (values 0..255).
        generator: random generator for ``u`` (on ``x``'s device), for
            reproducible noise.
        dtype: floating result dtype.  Rounding ``x + u`` to ``dtype`` can
            land on the bin's upper edge ``(x + 1) / 256``; the result is
            clamped below 1 so that ``x = 255`` never gives exactly 1 (which
            would break a logit).
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"dequantize expects a uint8 tensor of 0..255 values, got {got}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    y = (x.to(dtype) + u) / 256
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    return torch.minimum(y, below_one.to(y.device))


def pad_to(images: torch.Tensor, size: int | tuple[int, int], value: int | float = 0) -> torch.Tensor:
    """Pad ``(..., H, W)`` images with ``value`` to ``size`` (an int or ``(H', W')``), centred.

    Useful to make sides divisible by a power of 2 (e.g. Fashion-MNIST 28 ->
    32 for three 2x2 squeezes).  An odd amount of padding puts the extra row
    or column at the bottom / right.
    """
    if images.dim() < 2:
        raise ValueError(f"images must have at least 2 dimensions (..., H, W), got shape {tuple(images.shape)}")
    th, tw = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if th < h or tw < w:
        raise ValueError(f"cannot pad {h}x{w} images to the smaller size {th}x{tw}")
    top, left = (th - h) // 2, (tw - w) // 2
    return torch.nn.functional.pad(images, (left, tw - w - left, top, th - h - top), value=value)


class ImageBatches:
    """Re-iterable mini-batches of ``images`` (and ``labels``); no DataLoader needed.

    Each ``iter()`` is one epoch: ``(images[i], labels[i])`` tuples of
    ``batch_size`` rows (only image tensors if ``labels`` is None).  With
    ``shuffle`` every epoch uses a fresh permutation drawn from ``generator``
    (the global RNG if None), so a seeded generator gives a reproducible
    sequence of epochs.  ``drop_last`` skips a final short batch.
    ``len()`` is the number of batches per epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator, self.drop_last = generator, drop_last

    def __len__(self) -> int:
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator:
        n, b = len(self.images), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for start in range(0, len(self) * b, b):
            idx = slice(start, start + b) if order is None else order[start:start + b]
            x = self.images[idx]
            yield x if self.labels is None else (x, self.labels[idx])


#: ``batches(images, labels, batch_size, shuffle, generator, drop_last)``: the mini-batches of
#: :class:`ImageBatches` under the name the loaders' callers use.
batches = ImageBatches


# ----------------------------------------------------------------------------- checks of image arguments


def check_image_shape(shape) -> tuple[int, int, int]:
    """``shape`` as three positive ints ``(C, H, W)``, or a clear error naming what was given."""
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W), got {shape!r}") from None
    if min(c, h, w) < 1 or tuple(shape) != (c, h, w):
        raise ValueError(f"shape must be three positive ints (C, H, W), got {shape!r}")
    return c, h, w


def check_uint8_images(images: torch.Tensor, shape=None, name: str = "images") -> None:
    """Raise unless ``images`` is a ``uint8`` batch ``(B, C, H, W)`` (of ``shape`` ``(C, H, W)`` if given)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a uint8 torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 pixel values 0..255 (got dtype {images.dtype}); "
                        "for float images in [0, 1] use log_prob(x) instead")
    if images.dim() != 4 or (shape is not None and tuple(images.shape[1:]) != tuple(shape)):
        want = "(B, C, H, W)" if shape is None else f"(B, {', '.join(map(str, shape))})"
        raise ValueError(f"{name} has shape {tuple(images.shape)}, expected {want}")


# ----------------------------------------------------------------------------- classifier inputs

#: ``prepare_images`` maps uint8 pixels p to (p / 255 - INPUT_MEAN) / INPUT_STD, about [-2, 2].
INPUT_MEAN = 0.5
INPUT_STD = 0.25


def prepare_images(images: torch.Tensor, like: torch.Tensor | nn.Module | None = None) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` in 0..255 -> floats ``(p / 255 - 0.5) / 0.25``, about [-2, 2].

    ``like`` (a tensor or a module) gives the dtype and device (default float32, same device).
    Floating inputs are taken as already in [0, 1] and only normalised.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    dtype, device = torch.float32, images.device
    if isinstance(like, nn.Module):
        p = next(like.parameters(), None)
        if p is not None:
            dtype, device = p.dtype, p.device
    elif isinstance(like, torch.Tensor):
        dtype, device = like.dtype, like.device
    if images.dtype == torch.uint8:
        x = images.to(device=device, dtype=dtype) / 255
    elif images.is_floating_point():
        x = images.to(device=device, dtype=dtype)
    else:
        raise TypeError(f"images must be uint8 (0..255) or floating (0..1), got {images.dtype}")
    return (x - INPUT_MEAN) / INPUT_STD


def augment_images(images: torch.Tensor, flip: bool = True, crop: int = 4,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The usual CIFAR-10 augmentation on a batch: random horizontal flips and random crops
    after zero-padding ``crop`` pixels on each side. Any dtype; shape ``(B, C, H, W)`` kept."""
    b, _, h, w = images.shape
    out = images
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flips.to(images.device).view(b, 1, 1, 1), out.flip(-1), out)
    if crop:
        padded = F.pad(out, (crop, crop, crop, crop))  # (B, C, H + 2crop, W + 2crop)
        dy = torch.randint(0, 2 * crop + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * crop + 1, (b,), generator=generator).to(images.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=images.device)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=images.device)).view(b, 1, 1, w)
        c = images.shape[1]
        padded = padded.gather(2, rows.expand(b, c, h, w + 2 * crop))
        out = padded.gather(3, cols.expand(b, c, h, w))
    return out
