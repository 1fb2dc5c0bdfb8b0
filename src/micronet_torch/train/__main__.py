"""``python -m micronet_torch.train``: the entry point torchrun launches in every process (``micronet train``'s flags).

An entry point, like the ``micronet`` script: it sits on top of the package and only hands over to the CLI.
"""

import sys

from ..cli.train import main

sys.exit(main())
