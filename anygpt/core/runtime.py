"""How a loaded model is placed and run: device, precision, offload, quantization, compilation.

One frozen dataclass, validated once, shared by ``AnyGPTPipeline.from_pretrained``, the command line
(``--device --dtype --offload --quantize --compile``), the demo and the server; and the pieces that carry it out with
the libraries' own machinery: transformers' quantization configs for the LLM, accelerate's hooks for offloading
(``CpuOffload`` as in ``cpu_offload_with_hook``, ``cpu_offload``), diffusers' group offloading, ``torch.compile``.

What the estimate of each plan's GPU memory is: ``anygpt.core.memory``; which plan a real preset gets by default on a
GPU: ``anygpt.core.memory.default_runtime``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload, ModelHook, UserCpuOffloadHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device

from anygpt.base.errors import UsageError
from anygpt.base.utils import resolve_dtype, torchao_weight_config

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
OFFLOAD_PLANS = ("none", "decoders", "model", "sequential", "group")
QUANTIZATIONS = ("8bit", "4bit")
QUANTIZATION_BACKENDS = ("auto", "bitsandbytes", "torchao", "quanto")
_BACKEND_PACKAGES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto"}


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a pipeline runs.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; ``None`` keeps the pipeline on the CPU.
        dtype: one of ``DTYPES`` for every component; ``None`` keeps each component's configured dtype
            (``encoder.torch_dtype``, ``llm.torch_dtype``, ``decoders.*.torch_dtype``; fp32 unless configured).
        offload: ``"none"`` (everything on ``device``), ``"decoders"`` (the encoder, projectors and LLM stay on
            ``device``; each decoder stays loaded in CPU memory and comes onto ``device`` for its own call only),
            ``"model"`` (one large component on the accelerator at a time, as diffusers' ``enable_model_cpu_offload``;
            the projectors stay there), ``"sequential"`` (layer by layer, least memory, slowest), ``"group"`` (layers
            streamed to the accelerator with prefetching).
        quantize: ``None``, ``"8bit"`` or ``"4bit"`` weights for the LLM's linear layers (loaded with
            ``device_map``, never moved with ``.to()``; it stays on ``device`` whatever the offload plan), and for the
            decoders' UNet linear layers where the backend supports them (diffusers' ``PipelineQuantizationConfig``).
        quantization_backend: ``"auto"`` (bitsandbytes on CUDA, torchao elsewhere), or one named. ``"quanto"`` is
            accepted for the command line's sake but not wired: it raises when used.
        compile: ``torch.compile`` the LLM and the decoders' denoisers (the first calls compile them).
    """

    device: str | None = None
    dtype: str | None = None
    offload: str = "none"
    quantize: str | None = None
    quantization_backend: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.offload not in OFFLOAD_PLANS:
            raise UsageError(f"offload: expected one of {', '.join(OFFLOAD_PLANS)}, got {self.offload!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise UsageError(f"quantize: expected one of {', '.join(QUANTIZATIONS)} or none, got {self.quantize!r}")
        if self.quantization_backend not in QUANTIZATION_BACKENDS:
            raise UsageError(
                f"quantization_backend: expected one of {', '.join(QUANTIZATION_BACKENDS)}, "
                f"got {self.quantization_backend!r}"
            )
        if self.device is not None and not isinstance(self.device, str):
            raise UsageError(f"device: expected a device name such as 'cpu' or 'cuda:0', got {self.device!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise UsageError(
                    f"device: {self.device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')"
                ) from None
        if self.offload != "none" and (self.device is None or self.device == "cpu"):
            raise UsageError(f"offload {self.offload!r} moves components to an accelerator: give --device cuda")

    # ---- derived values

    @property
    def execution_device(self) -> torch.device:
        """Where the computation runs: ``device``, or the CPU."""
        return torch.device(self.device or "cpu")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """``dtype`` as a ``torch.dtype`` (None: each component's configured dtype)."""
        return None if self.dtype is None else resolve_dtype(self.dtype)

    @property
    def backend(self) -> str | None:
        """The quantization backend actually used: ``"auto"`` resolved for the device; None without ``quantize``."""
        if self.quantize is None:
            return None
        if self.quantization_backend != "auto":
            return self.quantization_backend
        return "bitsandbytes" if self.execution_device.type == "cuda" else "torchao"

    def describe(self) -> str:
        """A short label, e.g. ``"cuda float16, model offload, 8bit (bitsandbytes)"``."""
        parts = [f"{self.device or 'cpu'} {self.dtype or 'configured dtypes'}"]
        parts.append("no offload" if self.offload == "none" else f"{self.offload} offload")
        if self.quantize:
            parts.append(f"{self.quantize} ({self.backend})")
        if self.compile:
            parts.append("compiled")
        return ", ".join(parts)

    @classmethod
    def from_loader_arguments(
        cls, torch_dtype: str | torch.dtype | None = None, device_map: str | torch.device | None = None
    ) -> RuntimeOptions:
        """The options meant by diffusers / transformers style ``torch_dtype`` and ``device_map`` arguments.

        Args:
            torch_dtype: a dtype or its name.
            device_map: one device for the whole pipeline (``"cuda"``, ``"cuda:1"``, ``torch.device``); ``"auto"`` is
                resolved by the caller (``anygpt.core.memory.default_runtime``). Per-module maps are refused: give
                ``runtime=RuntimeOptions(offload=...)`` instead.

        Raises:
            UsageError: an unknown dtype, or a device map that is not one device.
        """
        dtype = None
        if torch_dtype is not None:
            names = {resolve_dtype(name): name for name in DTYPES}
            try:
                dtype = names[resolve_dtype(torch_dtype)]
            except (KeyError, ValueError):
                raise UsageError(f"torch_dtype: expected one of {', '.join(DTYPES)}, got {torch_dtype!r}") from None
        device = None
        if device_map is not None:
            if isinstance(device_map, torch.device):
                device = str(device_map)
            elif isinstance(device_map, str) and device_map not in ("auto", "balanced", "sequential"):
                device = device_map
            else:
                raise UsageError(
                    f"device_map: expected one device such as 'cuda' (or 'auto'), got {device_map!r}; to spread a "
                    "model over the CPU and an accelerator give runtime=RuntimeOptions(device='cuda', offload='model')"
                )
        return cls(device=device, dtype=dtype)


def check_backend_installed(backend: str) -> None:
    """Raise a clear ``UsageError`` when the quantization backend's package is missing or not wired."""
    if backend == "quanto":
        raise UsageError("quantization_backend 'quanto' is not supported yet: use 'bitsandbytes' or 'torchao'")
    module = _BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise UsageError(
            f"quantization backend {backend!r} is not installed: pip install 'anygpt[quant]' (or pip install {backend})"
        )


def llm_quantization_config(runtime: RuntimeOptions, compute_dtype: torch.dtype):
    """transformers' quantization config for the LLM under ``runtime`` (None without ``quantize``).

    bitsandbytes: ``BitsAndBytesConfig`` (8-bit LLM.int8, or 4-bit NF4 computing in ``compute_dtype``); torchao:
    ``TorchAoConfig`` with :func:`anygpt.base.utils.torchao_weight_config`. Embeddings and the LM head stay in
    ``compute_dtype`` (both libraries skip the output layer).
    """
    backend = runtime.backend
    if backend is None:
        return None
    check_backend_installed(backend)
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if backend == "bitsandbytes":
        if runtime.quantize == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )
    bits = 8 if runtime.quantize == "8bit" else 4
    return TorchAoConfig(torchao_weight_config(bits, runtime.execution_device))


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether transformers or diffusers loaded ``module`` (or the model a peft wrapper holds) quantized."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return getattr(base, "hf_quantizer", None) is not None


# --------------------------------------------------------------------------------------------------------------
# Model-level offload: one large component on the accelerator at a time (accelerate's CpuOffload hooks)
# --------------------------------------------------------------------------------------------------------------


class _SwapIn(CpuOffload):
    """accelerate's ``CpuOffload`` hook whose "previous model" is whichever member of its group ran last, so that
    the order of the components may change from call to call (a request reads media or not, renders any decoder)."""

    def __init__(self, group: ModelOffload, name: str):
        super().__init__(execution_device=group.device)
        self.group = group
        self.name = name

    def pre_forward(self, module, *args, **kwargs):
        self.prev_module_hook = self.group._swap_to(self.name)
        return super().pre_forward(module, *args, **kwargs)


class _OnloadOwner(ModelHook):
    """On a submodule that is called directly (the LLM's input embeddings): bring its owner component onto the
    accelerator first, then move the inputs there."""

    def __init__(self, group: ModelOffload, owner: str):
        self.group = group
        self.owner = owner

    def pre_forward(self, module, *args, **kwargs):
        self.group.activate(self.owner)
        return send_to_device(args, self.group.device), send_to_device(kwargs, self.group.device)


class ModelOffload:
    """Keep large components in CPU memory and move one at a time onto ``device`` when it runs, the way diffusers'
    ``enable_model_cpu_offload`` does for a pipeline's components, with accelerate's hooks.

    A component stays on the accelerator after its forward (a loop over it costs no transfer) until another member
    runs, or :meth:`offload_all` is called (before a decoder runs, whose own diffusers hooks then take over).

    Args:
        device: the execution device (an accelerator; ``"cpu"`` attaches the same hooks and moves nothing).

    Example:
        >>> group = ModelOffload("cuda")  # doctest: +SKIP
        >>> group.add("encoder", model.encoder)  # doctest: +SKIP
        >>> group.add("llm", model.language_model, also=[model.language_model.get_input_embeddings()])  # doctest: +SKIP
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self._hooks: dict[str, UserCpuOffloadHook] = {}
        self._extra: list[torch.nn.Module] = []
        self._resident: str | None = None

    @property
    def members(self) -> list[str]:
        return list(self._hooks)

    @property
    def resident(self) -> str | None:
        """The member that ran last and may still be on the accelerator (None after :meth:`offload_all`)."""
        return self._resident

    def add(self, name: str, module: torch.nn.Module, *, also: Iterable[torch.nn.Module] = ()) -> None:
        """Put ``module`` in CPU memory behind a hook that moves it onto the device when its forward runs.

        Args:
            name: the member's name.
            module: the component.
            also: submodules of ``module`` that callers invoke directly: calling one brings ``module`` on first.
        """
        if name in self._hooks:
            raise ValueError(f"model offload: {name!r} is already a member")
        hook = _SwapIn(self, name)
        add_hook_to_module(module, hook, append=True)  # init_hook moves it to the CPU
        self._hooks[name] = UserCpuOffloadHook(module, hook)
        for sub in also:
            add_hook_to_module(sub, _OnloadOwner(self, name), append=True)
            self._extra.append(sub)

    def activate(self, name: str) -> None:
        """Move member ``name`` onto the device now (and the resident one off)."""
        user = self._hooks[name]
        user.hook.pre_forward(user.model)

    def offload_all(self) -> None:
        """Move the resident member back to the CPU (before something else needs the accelerator)."""
        if self._resident is not None:
            self._hooks[self._resident].offload()
            self._resident = None
            _empty_cache(self.device)

    def remove(self) -> None:
        """Detach every hook; the components stay where they are."""
        for user in self._hooks.values():
            remove_hook_from_module(user.model)
        for sub in self._extra:
            remove_hook_from_module(sub)
        self._hooks.clear()
        self._extra.clear()
        self._resident = None

    def _swap_to(self, name: str) -> UserCpuOffloadHook | None:
        previous = self._resident if self._resident != name else None
        self._resident = name
        return self._hooks[previous] if previous is not None else None


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Sequential and group offload of one module; compilation
# --------------------------------------------------------------------------------------------------------------


def offload_sequentially(
    module: torch.nn.Module, device: str | torch.device, *, preload: Iterable[str] | None = None
) -> None:
    """accelerate's ``cpu_offload``: the weights wait in CPU memory (the module's own tensors go to ``meta``) and
    each leaf layer's are moved onto ``device`` for its forward only. Least memory, slowest.

    Args:
        preload: class names of submodules that read their children's tensors directly (loaded whole for their
            forward), e.g. ImageBind's preprocessors (``ImageBindEncoder.preload_module_classes``).
    """
    preload = list(preload or getattr(module, "preload_module_classes", []))
    cpu_offload(module, execution_device=torch.device(device), offload_buffers=True, preload_module_classes=preload)


def offload_in_groups(module: torch.nn.Module, device: str | torch.device) -> None:
    """diffusers' ``apply_group_offloading`` at leaf level for any ``nn.Module``: each layer moves onto ``device``
    for its forward, with the next one prefetched on a CUDA stream (``use_stream`` on CUDA)."""
    from diffusers.hooks import apply_group_offloading  # diffusers' hook package, for a non-diffusers module

    device = torch.device(device)
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=device.type == "cuda",
    )


def remove_offload_hooks(modules: Iterable[torch.nn.Module]) -> None:
    """Detach accelerate hooks (sequential offload restores the weights from CPU memory)."""
    for module in modules:
        remove_hook_from_module(module, recurse=True)


def compile_module(module: torch.nn.Module, **options) -> None:
    """``torch.compile`` ``module`` in place (``nn.Module.compile``: it keeps its type, attributes and hooks)."""
    module.compile(**options)


def move(module: torch.nn.Module | None, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """``module.to(device, dtype)`` for an unquantized module (a quantized one is never moved or cast)."""
    if module is None or (device is None and dtype is None):
        return
    if is_quantized(module):
        raise UsageError(
            "a quantized model is placed when it is loaded and never moved or cast: load the pipeline with "
            "runtime=RuntimeOptions(device=..., quantize=...) instead"
        )
    module.to(device=device, dtype=dtype)
