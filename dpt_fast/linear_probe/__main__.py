"""``python -m dpt_fast.linear_probe``: the drop-in for ``lpclip/linear_probe.py``."""

import sys

from dpt_fast.linear_probe.lpclip import main

sys.exit(main())
