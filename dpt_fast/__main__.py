"""``python -m dpt_fast`` (also under ``torchrun``): the same CLI as ``dpt-fast``."""

import sys

from dpt_fast.cli import main

sys.exit(main())
