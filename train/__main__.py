"""``python -m train ARGS``: the same as ``glue-train ARGS`` (a command, else ``train``)."""

import sys

from train.cli import main

sys.exit(main())
