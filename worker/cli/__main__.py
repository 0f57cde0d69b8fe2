"""``python -m worker.cli``: the ``restorelcc`` command."""

import sys

from worker.cli.main import main

sys.exit(main())
