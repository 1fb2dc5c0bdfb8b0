"""``python -m micronet_torch.cli``: the ``micronet`` command."""

import sys

from .main import main

sys.exit(main())
