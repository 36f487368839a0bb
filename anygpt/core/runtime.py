"""How a loaded model is placed and run: device, precision, offload, quantization, compilation.

One frozen dataclass, validated once, shared by ``AnyGPTPipeline.from_pretrained``, the command line
(``--device --dtype --offload --quantize --compile``), the demo and the server.
"""

from __future__ import annotations

from dataclasses import dataclass

from anygpt.base.errors import UsageError

DTYPES = ("float32", "float16", "bfloat16")
OFFLOAD_PLANS = ("none", "model", "sequential", "group")
QUANTIZATIONS = ("8bit", "4bit")
QUANTIZATION_BACKENDS = ("auto", "bitsandbytes", "torchao", "quanto")


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a pipeline runs.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``; ``None`` keeps the pipeline on the CPU.
        dtype: one of ``DTYPES`` for every component; ``None`` keeps each component's configured dtype
            (fp32 on the CPU).
        offload: ``"none"`` (everything on ``device``), ``"model"`` (one component on the accelerator at a time,
            as diffusers' ``enable_model_cpu_offload``), ``"sequential"`` (layer by layer, least memory, slowest),
            ``"group"`` (blocks of layers streamed to the accelerator).
        quantize: ``None``, ``"8bit"`` or ``"4bit"`` weights for the LLM (and the decoders' transformer layers
            where the backend supports them).
        quantization_backend: ``"auto"`` (bitsandbytes on CUDA, torchao on the CPU), or one named.
        compile: ``torch.compile`` the LLM and the decoders' denoisers.
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
        if self.offload != "none" and (self.device is None or self.device == "cpu"):
            raise UsageError(f"offload {self.offload!r} moves components to an accelerator: give --device cuda")
