"""Helpers for the book's chapters: the one-line setup, the results files, and the repository's address.

A chapter opens with one hidden cell::

    import sys
    if "google.colab" in sys.modules:  # Colab: install the book's package first
        %pip install -q "invertible-convnets @ git+https://github.com/iconv-book/invertible-convnets"
    from iconv.book import setup; BOOK = setup()

:func:`setup` picks the device (CUDA when present), the size (``ICONV_SIZE``: ``ci``, ``gpu`` or
``paper``; ``gpu`` by default on a GPU, ``ci`` otherwise), seeds torch, uses one CPU thread for the
chapters' small tensors (torch's thread pool spins badly on a shared machine), and prints the
versions; it warns when torch lies outside the range the package is tested on. Timing uses
:func:`iconv.bench.time_interleaved`; experiment settings come from :mod:`iconv.configs`.
"""
from __future__ import annotations

import contextlib
import io
import os
import platform
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Book", "REPO_URL", "SIZES", "glue", "glue_output", "results_file", "setup"]

#: Must equal ``repository: url:`` in ``_config.yml`` (tests/test_book_config.py checks it).
REPO_URL = "https://github.com/iconv-book/invertible-convnets"
SIZES = ("ci", "gpu", "paper")
#: The torch releases the test suite has passed on (CI runs the oldest pinned and the newest reachable).
TESTED_TORCH = ("2.13", "2.14")


@dataclass(frozen=True)
class Book:
    """What :func:`setup` chose: ``device``, ``size`` and whether a GPU is used."""

    device: torch.device
    size: str

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _torch_release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def setup(seed: int = 0, size: str | None = None, quiet: bool = False) -> Book:
    """Choose device and size, seed torch, and print one line of versions (see the module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = size or os.environ.get("ICONV_SIZE") or ("gpu" if device.type == "cuda" else "ci")
    if size not in SIZES:
        raise ValueError(f"ICONV_SIZE must be one of {', '.join(SIZES)}, got {size!r}")
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(seed)
    import iconv

    release = _torch_release(torch.__version__)
    if release not in TESTED_TORCH:
        warnings.warn(f"torch {torch.__version__} is outside the releases iconv is tested on "
                      f"({', '.join(TESTED_TORCH)}); results may differ", stacklevel=2)
    if not quiet:
        gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
        print(f"python {platform.python_version()} | torch {torch.__version__} | iconv {iconv.__version__} | "
              f"device {device}{gpu} | size {size}")
    return Book(device, size)


def _repository_root() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    return here if (here / "book" / "results").is_dir() else None


def results_file(*parts: str) -> Path:
    """The path of ``book/results/<parts>``: the checkout's own file, or (outside a checkout, e.g. in
    Colab) a copy fetched once from the repository into ``./results/``."""
    relative = Path(*parts)
    for base in filter(None, (_repository_root(), Path.cwd().parent)):
        candidate = base / "book" / "results" / relative
        if candidate.exists():
            return candidate
    local = Path("results") / relative
    if not local.exists():
        raw = REPO_URL.replace("https://github.com/", "https://raw.githubusercontent.com/")
        local.parent.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(f"{raw}/main/book/results/{relative.as_posix()}", local)
    return local


def glue(name: str, value, display: bool = False) -> None:
    """Store ``value`` under ``name`` for the page's prose (myst-nb's ``{glue:text}`name:.2f```).

    Tensor and numpy scalars are stored as Python numbers (so format specs apply). Outside a book
    build, e.g. in Colab without myst-nb, it only displays ``value`` when ``display`` is true.
    """
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            from IPython.display import display as show
            show(value)
        return
    myst_glue(name, value, display=display)


class _Printed(str):
    """Text that displays as itself (no quotes): what :func:`glue_output` glues."""

    def __repr__(self) -> str:
        return str(self)


@contextlib.contextmanager
def glue_output(name: str):
    """Capture what the enclosed code prints and glue it (myst-nb) as ``name`` instead of printing it.

    For exercise solutions: the page shows the text inside the solution's dropdown with
    ```` ```{glue} name ``` ````, not under the exercise. Outside a book build it prints as usual.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().rstrip("\n")
        try:
            from myst_nb import glue
        except ImportError:  # e.g. Colab without myst-nb: just print
            print(text)
        else:
            glue(name, _Printed(text), display=False)
