"""The command-line options of ``RuntimeOptions`` (device, precision, offload, quantization, compilation), shared by
every command that runs a model (``anygpt generate``, ``app.py``)."""

from __future__ import annotations

import argparse

from anygpt.core.runtime import DTYPES, OFFLOAD_PLANS, QUANTIZATION_BACKENDS, QUANTIZATIONS, RuntimeOptions


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device --dtype --offload --quantize --quantization-backend --compile`` to ``parser``.

    The values are checked by ``RuntimeOptions`` (``runtime_options``), so a bad one is one ``UsageError`` line.
    """
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    group.add_argument(
        "--dtype", default=None, help=f"{', '.join(DTYPES)} for every component (default: each one's own, fp32 on cpu)"
    )
    group.add_argument(
        "--offload",
        default="none",
        help=f"{', '.join(OFFLOAD_PLANS)}: which components wait in CPU memory until used (default none)",
    )
    group.add_argument("--quantize", default=None, help=f"{', '.join(QUANTIZATIONS)} or none: the LLM's weights")
    group.add_argument(
        "--quantization-backend", default="auto", help=f"{', '.join(QUANTIZATION_BACKENDS)} (default auto)"
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the LLM and the decoders' denoisers")


def runtime_options(args: argparse.Namespace) -> RuntimeOptions | None:
    """The ``RuntimeOptions`` the parsed options ask for; None when every one is left at its default.

    Raises:
        UsageError: a bad value, naming the option (from ``RuntimeOptions``).
    """
    quantize = None if args.quantize in (None, "none") else args.quantize
    options = RuntimeOptions(
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        quantize=quantize,
        quantization_backend=args.quantization_backend,
        compile=args.compile,
    )
    return None if options == RuntimeOptions() else options
