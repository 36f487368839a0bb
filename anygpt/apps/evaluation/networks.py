"""The feature networks behind the metrics, found on this machine only: nothing is downloaded.

==============  ==========================  ===========================================================================
network         used by                     where it is looked for, in order
==============  ==========================  ===========================================================================
``inception``   ``fid``, ``kid`` (t2i)      ``--inception FILE``, ``$ANYGPT_EVAL_INCEPTION``, torch-fidelity's weights
                                            file in the torch hub cache (``$TORCH_HOME/hub/checkpoints/``)
``clip``        ``clip_score``, ``clipsim`` ``--clip DIR|ID``, ``$ANYGPT_EVAL_CLIP``, ``openai/clip-vit-large-patch14``
                                            (torchmetrics' default) in the Hugging Face cache
``clap``        ``fad``, ``clap_score``     ``--clap DIR|ID``, ``$ANYGPT_EVAL_CLAP``, ``laion/clap-htsat-unfused``
                                            (AudioLDM's CLAP) in the Hugging Face cache
``i3d``         ``fvd`` (t2v, optional)     ``--i3d FILE``, ``$ANYGPT_EVAL_I3D``: the TorchScript I3D of StyleGAN-V's
                                            FVD (``i3d_torchscript.pt``); no default, FVD is measured only when given
==============  ==========================  ===========================================================================

A network that is asked for and not found raises one ``FileNotFoundError`` naming it, the metrics that need it and
every place looked.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anygpt.base.utils import resolve_local_model

logger = logging.getLogger(__name__)

__all__ = ["NETWORKS", "FeatureNetworks", "NetworkSpec"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception-v3 weights (the TensorFlow FID network converted), as its downloader names them."""


@dataclass(frozen=True)
class NetworkSpec:
    """How one feature network is found: its flag, environment variable and default."""

    what: str
    flag: str
    env: str
    default: str | None
    metrics: tuple[str, ...]
    kind: str  # "hf": a transformers folder or hub id (cache only); "file": a weights file


NETWORKS: dict[str, NetworkSpec] = {
    "inception": NetworkSpec("Inception-v3 (torch-fidelity)", "--inception", "ANYGPT_EVAL_INCEPTION", None,
                             ("fid", "kid"), "file"),
    "clip": NetworkSpec("CLIP", "--clip", "ANYGPT_EVAL_CLIP", "openai/clip-vit-large-patch14",
                        ("clip_score", "clipsim"), "hf"),
    "clap": NetworkSpec("CLAP", "--clap", "ANYGPT_EVAL_CLAP", "laion/clap-htsat-unfused", ("fad", "clap_score"), "hf"),
    "i3d": NetworkSpec("I3D (TorchScript, StyleGAN-V's FVD detector)", "--i3d", "ANYGPT_EVAL_I3D", None, ("fvd",),
                       "file"),
}  # fmt: skip


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass
class FeatureNetworks:
    """The feature networks of one run: where each comes from (flags; None: the environment, then the default) and,
    once loaded, the network itself (each loads on first use and is kept).

    Args:
        sources: network name -> a path or hub id given on the command line.
        device: where the networks run.
    """

    sources: dict[str, str | None] = field(default_factory=dict)
    device: str = "cpu"
    _loaded: dict[str, Any] = field(default_factory=dict, repr=False)

    def locate(self, name: str) -> str:
        """The local path of network ``name``.

        Raises:
            FileNotFoundError: naming the network, the metrics that need it and every place looked.
        """
        spec = NETWORKS[name]
        looked: list[str] = []
        given = self.sources.get(name)
        env = os.environ.get(spec.env)
        candidates = [(given, spec.flag), (env, f"${spec.env}")]
        if spec.kind == "hf" and spec.default:
            candidates.append((spec.default, "the default"))
        if name == "inception":
            candidates.append((str(_torch_hub_checkpoints() / INCEPTION_FILE), "torch hub cache"))
        for source, origin in candidates:
            if not source:
                looked.append(f"{origin} not set")
                continue
            if spec.kind == "file":
                path = Path(source).expanduser()
                if path.is_file():
                    return str(path)
                looked.append(f"{origin}: {path} does not exist")
                continue
            try:
                return resolve_local_model(source, what=spec.what)
            except FileNotFoundError as err:
                looked.append(f"{origin}: {err}")
        raise FileNotFoundError(
            f"{spec.what}, needed for {' and '.join(spec.metrics)}, is not on this machine (nothing is downloaded); "
            f"looked at: {'; '.join(looked)}. Give it with {spec.flag} or ${spec.env}, or leave those metrics out "
            "with --metrics"
        )

    def describe(self) -> dict[str, str]:
        """Network name -> the path it was loaded from, for the networks used so far (a report's entry)."""
        return {name: loaded[0] for name, loaded in self._loaded.items()}

    # ------------------------------------------------------------------ loaders
    def clip(self) -> tuple[Any, Any]:
        """``(CLIPModel, CLIPProcessor)`` in eval mode on ``device``."""
        if "clip" not in self._loaded:
            from transformers import CLIPModel, CLIPProcessor  # heavy: only when a CLIP metric runs

            path = self.locate("clip")
            model = CLIPModel.from_pretrained(path).eval().to(self.device)
            self._loaded["clip"] = (path, (model, CLIPProcessor.from_pretrained(path)))
        return self._loaded["clip"][1]

    def clap(self) -> tuple[Any, Any, Any]:
        """``(ClapModel, ClapFeatureExtractor, tokenizer)`` in eval mode on ``device``."""
        if "clap" not in self._loaded:
            from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel  # heavy: only for CLAP metrics

            path = self.locate("clap")
            model = ClapModel.from_pretrained(path).eval().to(self.device)
            extractor = ClapFeatureExtractor.from_pretrained(path)
            self._loaded["clap"] = (path, (model, extractor, AutoTokenizer.from_pretrained(path)))
        return self._loaded["clap"][1]

    def inception(self) -> torch.nn.Module:
        """torchmetrics' ``NoTrainInceptionV3`` (2048 pool features, uint8 images in) from the local weights."""
        if "inception" not in self._loaded:
            from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity; only for FID / KID

            path = self.locate("inception")
            _check_tensor_file(path)
            network = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
            )
            self._loaded["inception"] = (path, network.to(self.device))
        return self._loaded["inception"][1]

    def i3d(self) -> torch.jit.ScriptModule:
        """The TorchScript I3D detector of FVD."""
        if "i3d" not in self._loaded:
            path = self.locate("i3d")
            if not _is_torchscript(path):
                raise ValueError(f"{NETWORKS['i3d'].flag} {path}: not a TorchScript archive (torch.jit.save)")
            self._loaded["i3d"] = (path, torch.jit.load(path, map_location=self.device).eval())
        return self._loaded["i3d"][1]


def _check_tensor_file(path: str) -> None:
    """Refuse a weights file that holds anything but tensors: torch-fidelity loads it with ``weights_only=False``,
    so it is read once with ``weights_only=True`` first (which rejects arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a file that is not a safe tensor file
        raise ValueError(f"{path}: not a weights file holding only tensors ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 2)[1:2] == ["code"] for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
