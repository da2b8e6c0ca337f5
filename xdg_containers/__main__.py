"""``python -m xdg_containers`` is the ``xdg-containers`` command."""

import sys

from .cli import main

sys.exit(main())
