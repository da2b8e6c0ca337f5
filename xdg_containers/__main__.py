"""``python -m xdg_containers`` is the ``xdg-containers`` command."""

import sys

from xdg_containers.cli.main import main

sys.exit(main())
