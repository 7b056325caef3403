"""``python -m logix.cli``: the ``logix`` command line."""

import sys

from logix.cli.main import main

sys.exit(main())
