"""Dataset readers for NExT-GPT's on-disk formats, the records they produce, and a small synthetic sample dataset."""

from toyworld.sample import write_sample_dataset
from training.data.readers import DatasetError, detect_format, list_formats, read_dataset
from training.data.records import PLACEHOLDERS, DatasetSpec, MediaFile, OutputMedia, Pair, Record, Sample, Turn

__all__ = [
    "PLACEHOLDERS",
    "DatasetError",
    "DatasetSpec",
    "MediaFile",
    "OutputMedia",
    "Pair",
    "Record",
    "Sample",
    "Turn",
    "detect_format",
    "list_formats",
    "read_dataset",
    "write_sample_dataset",
]
