"""The foundation: modalities, media I/O, errors and small utilities. Imports nothing else of the project."""
