"""Applications on top of the pipeline: command-line generation, the chat engine of the demo, the server."""
