"""``python -m slimformer.cli``: the same as the ``slimformer`` command."""

import sys

from slimformer.cli import main

sys.exit(main())
