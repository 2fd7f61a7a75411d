"""``python -m wsi_lymph.cli``: the same as the ``wsi-lymph`` command."""

import sys

from wsi_lymph.cli.main import main

sys.exit(main())
