"""Meta's ``imagebind`` package (from ``imagebind-unofficial``), imported with the shims it needs today."""

from __future__ import annotations

import sys
import warnings

import torch


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
    # Module-level tensors of imagebind and of what it imports (torchaudio.compliance.kaldi's EPSILON, which our audio
    # transform's fbank uses) are made on the CPU even when the first import happens inside
    # ``with torch.device("meta")`` (an encoder built from a checkpoint): a default-device context would otherwise
    # leave them on meta for the rest of the process.
    with warnings.catch_warnings(), torch.device("cpu"):
        warnings.filterwarnings("ignore", message=".*pkg_resources.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)
        import torchaudio.compliance.kaldi  # noqa: F401
        from imagebind.models import imagebind_model

    return imagebind_model
