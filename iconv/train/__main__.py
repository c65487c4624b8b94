"""``python -m iconv.train``: see :mod:`iconv.train.cli`."""
import sys

from .cli import main

sys.exit(main())
