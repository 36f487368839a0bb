"""Logging set-up for entry points (the command line, the demo): kept free of heavy imports so that ``anygpt --help``
loads nothing but the standard library."""

from __future__ import annotations

import logging

# Notices that optional backends print while diffusers and transformers import them (torchao's pytree
# registrations, bitsandbytes' missing CPU kernels package): for their developers, not for a command's user.
_IMPORT_NOISE = ("torch.utils._pytree", "bitsandbytes", "diffusers.quantizers", "transformers.quantizers")


def quiet_import_notices() -> None:
    """Silence (below ERROR) the import-time notices of optional backends. For entry points only (the command line,
    the demo), before the heavy imports; library code never changes logging."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
