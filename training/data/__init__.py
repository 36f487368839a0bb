"""Dataset readers for NExT-GPT's on-disk formats and the records they produce."""

from training.data.readers import DatasetError, detect_format, list_formats, read_dataset
from training.data.records import DatasetSpec, Dialogue, MediaFile, OutputMedia, Pair, Record, Turn

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "Dialogue",
    "MediaFile",
    "OutputMedia",
    "Pair",
    "Record",
    "Turn",
    "detect_format",
    "list_formats",
    "read_dataset",
]
