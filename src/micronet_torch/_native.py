"""The former name of ``micronet_torch.kernels.build``: importing it gives that very module."""

import sys

from .kernels import build

sys.modules[__name__] = build
