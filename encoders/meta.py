"""Meta's ``imagebind`` package (from ``imagebind-unofficial``), imported with the shims it needs today."""

from __future__ import annotations

import sys
import warnings


def import_imagebind():
    """Import Meta's ``imagebind.models.imagebind_model`` and return it.

    pytorchvideo 0.1.5 (imported by ``imagebind``) needs ``torchvision.transforms.functional_tensor``, which
    torchvision renamed to ``_functional_tensor``; the old name is aliased in ``sys.modules`` first (once).
    """
    name = "torchvision.transforms.functional_tensor"
    if name not in sys.modules:
        try:
            import torchvision.transforms.functional_tensor  # noqa: F401
        except ImportError:
            import torchvision.transforms._functional_tensor as functional_tensor

            sys.modules[name] = functional_tensor
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        from imagebind.models import imagebind_model

    return imagebind_model
