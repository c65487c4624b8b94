"""``python -m iconv.bench``: see :mod:`iconv.bench.cli`."""
import sys

from .cli import main

main(sys.argv[1:])
