"""Where the pipeline's components run: ``to()``, a ``RuntimeOptions`` plan, and the offload plans (decoders only,
model-level CPU offload on accelerate's hooks, sequential and group offload), as methods of ``AnyGPTPipeline``."""

from __future__ import annotations

import logging

import torch
from typing_extensions import Self

from anygpt.base.errors import UsageError
from anygpt.base.modality import Modality
from anygpt.base.utils import resolve_dtype
from anygpt.core.runtime import (
    ModelOffload,
    RuntimeOptions,
    compile_module,
    is_quantized,
    move,
    offload_in_groups,
    offload_sequentially,
    remove_offload_hooks,
)

logger = logging.getLogger(__name__)


class PlacementMixin:
    """Device, precision and offload methods of ``AnyGPTPipeline`` (``self.model``, ``self.decoders``, and the
    ``_runtime`` / ``_offload`` / ``_model_offload`` state its constructor sets)."""

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Self:
        """Move the model and the decoders (decoders not loaded yet move when they load).

        Raises:
            UsageError: the pipeline is offloaded (``remove_offload()`` first), or moving or casting a quantized LLM
                (it is placed when loaded: ``from_pretrained(runtime=...)``).
        """
        if self._offload is not None:
            raise UsageError(
                f"the pipeline is offloaded ({self._offload}): call remove_offload() before moving it with .to()"
            )
        device = None if device is None else torch.device(device)
        llm = self.model.language_model
        if is_quantized(llm):
            here = llm.get_input_embeddings().weight.device
            if dtype is not None or (device is not None and device != here):
                move(llm, device, dtype)  # raises: a quantized model is never moved or cast
        self._move(device, None if dtype is None else resolve_dtype(dtype))
        return self

    def _move(self, device: torch.device | None, dtype: torch.dtype | None) -> None:
        """Every component to ``device`` / ``dtype``, a quantized LLM excepted (it stays as loaded)."""
        modules = [*self._small_modules(), self.model.encoder]
        if not is_quantized(self.model.language_model):
            modules.append(self.model.language_model)
        for module in modules:
            module.to(device=device, dtype=dtype)
        for decoder in self.decoders.values():
            decoder.to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ placement (anygpt.core.runtime)
    @property
    def runtime(self) -> RuntimeOptions | None:
        """The options the pipeline was placed with (None: never placed, on the CPU in the configured dtypes)."""
        return self._runtime

    @property
    def offload_plan(self) -> str:
        """One of ``anygpt.core.runtime.OFFLOAD_PLANS``."""
        return self._offload or "none"

    def apply_runtime(self, runtime: RuntimeOptions) -> Self:
        """Place the pipeline as ``runtime`` says: dtype, then device or offload plan, then compilation.

        The LLM's quantization is decided when it loads (``from_pretrained(runtime=...)``); a quantized LLM stays on
        the device it was loaded on whatever the plan. Decoders' quantization applies at their next load.
        """
        if self._offload is not None:
            self.remove_offload()
        device = None if runtime.device is None else runtime.execution_device
        for decoder in self.decoders.values():
            decoder.set_quantization(runtime.quantize, runtime.backend or "torchao")
        self._move(device if runtime.offload == "none" else None, runtime.torch_dtype)
        if runtime.offload == "decoders":
            self.enable_decoder_offload(device)
        elif runtime.offload == "model":
            self.enable_model_cpu_offload(device)
        elif runtime.offload == "sequential":
            self.enable_sequential_cpu_offload(device)
        elif runtime.offload == "group":
            self.enable_group_offload(device)
        if runtime.compile:
            compile_module(self.model.language_model)
            for decoder in self.decoders.values():
                decoder.set_compile(True)
        self._runtime = runtime
        return self

    def enable_decoder_offload(self, device: str | torch.device | None = None) -> Self:
        """The encoder, projectors and LLM on ``device`` for good; each decoder stays loaded in CPU memory and comes
        onto ``device`` for its own call only (diffusers' ``enable_model_cpu_offload``), leaving it after every use.
        The fastest plan that keeps a real system under 24 GB (``anygpt.core.memory``).

        Args:
            device: the accelerator (default: CUDA); ``"cpu"`` attaches the same hooks and moves nothing (tests).
        """
        device = self._offload_device(device)
        self._begin_offload(device)
        self.model.encoder.to(device)
        if not is_quantized(self.model.language_model):
            self.model.language_model.to(device)
        for decoder in self.decoders.values():
            decoder.enable_offload("model", device)
        self._offload = "decoders"
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> Self:
        """One large component on the accelerator at a time, as diffusers' ``enable_model_cpu_offload``: the encoder
        and the LLM wait in CPU memory behind accelerate's ``CpuOffload`` hooks and move onto ``device`` when they run
        (the other one moves off); each decoder uses diffusers' own model offload and leaves the accelerator after
        every use (it stays loaded). The projectors (and cross-attention blocks) stay on ``device``; so does a
        quantized LLM. Peak memory: the largest component plus its activations (``anygpt.core.memory``).

        Args:
            device: the accelerator (default: CUDA). ``"cpu"`` attaches the same hooks and moves nothing (tests).
        """
        device = self._offload_device(device)
        self._begin_offload(device)
        group = ModelOffload(device)
        group.add("encoder", self.model.encoder)
        llm = self.model.language_model
        if not is_quantized(llm):
            group.add("llm", llm, also=[llm.get_input_embeddings()])
        for decoder in self.decoders.values():
            decoder.enable_offload("model", device, before_use=group.offload_all)
        self._model_offload = group
        self._offload = "model"
        return self

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> Self:
        """Least memory, slowest: every layer of the encoder, the LLM and the decoders waits in CPU memory and moves
        onto ``device`` for its forward only (accelerate's ``cpu_offload``; diffusers' ``enable_sequential_cpu_offload``
        for the decoders). A quantized LLM stays on its device.

        Args:
            device: the accelerator (default: CUDA); ``"cpu"`` runs the same hooks on the CPU (tests).
        """
        device = self._offload_device(device)
        self._begin_offload(device)
        offload_sequentially(self.model.encoder, device)
        if not is_quantized(self.model.language_model):
            offload_sequentially(self.model.language_model, device)
        for decoder in self.decoders.values():
            decoder.enable_offload("sequential", device)
        self._offload = "sequential"
        return self

    def enable_group_offload(self, device: str | torch.device | None = None) -> Self:
        """Layers stream onto ``device`` one group at a time, the next prefetched on a CUDA stream (diffusers'
        ``apply_group_offloading`` for the encoder and the LLM, leaf level; ``enable_group_offload`` at block level
        for the decoders). Cannot be undone on loaded components (reload the pipeline). A quantized LLM stays on its
        device.

        Args:
            device: the accelerator (default: CUDA); ``"cpu"`` runs the same hooks on the CPU (tests).
        """
        device = self._offload_device(device)
        self._begin_offload(device)
        offload_in_groups(self.model.encoder, device)
        if not is_quantized(self.model.language_model):
            offload_in_groups(self.model.language_model, device)
        for decoder in self.decoders.values():
            decoder.enable_offload("group", device)
        self._offload = "group"
        return self

    def remove_offload(self) -> Self:
        """Detach the offload hooks; every component (decoders too) goes back to plain placement on the CPU.

        Raises:
            UsageError: group offload, which diffusers cannot undo (load the pipeline again).
        """
        if self._offload is None:
            return self
        if self._offload == "group":
            raise UsageError("group offload cannot be undone: load the pipeline again")
        if self._model_offload is not None:
            self._model_offload.offload_all()
            self._model_offload.remove()
            self._model_offload = None
        elif self._offload == "sequential":
            remove_offload_hooks([self.model.encoder, self.model.language_model])
        self._move(torch.device("cpu"), None)
        for decoder in self.decoders.values():
            decoder.enable_offload("none", "cpu")
        self.model.execution_device = self.model.encoder.execution_device = None
        self._offload = None
        return self

    def unload_decoders(self, modalities: list[str | Modality] | None = None) -> None:
        """Free the memory of loaded decoders (all, or those of ``modalities``); each loads again on its next use."""
        for modality in self.decoders if modalities is None else [Modality.parse(m) for m in modalities]:
            self.decoders[modality].unload()

    def _small_modules(self) -> list[torch.nn.Module]:
        modules: list[torch.nn.Module] = [self.model.input_projectors, self.model.output_projectors]
        if self.model.cross_attention is not None:
            modules.append(self.model.cross_attention)
        return modules

    def _offload_device(self, device: str | torch.device | None) -> torch.device:
        if device is None:
            if not torch.cuda.is_available():
                raise UsageError("offloading moves components to an accelerator, and no CUDA device is available")
            device = "cuda"
        return torch.device(device)

    def _begin_offload(self, device: torch.device) -> None:
        """Drop an earlier plan; the small modules go to ``device`` for good; inputs go to ``device``."""
        if self._offload is not None:
            self.remove_offload()
        for module in self._small_modules():
            module.to(device)
        self.model.execution_device = self.model.encoder.execution_device = device

    # ------------------------------------------------------------------ steps
