"""``python -m gemmbridge``: the ``gemmbridge`` command (``info``, ``bench``, ``stress``)."""

import sys

from .cli import main

sys.exit(main())
