"""Staged training of anygpt systems: Q-Former pretraining (optional), encoder-side alignment, decoder-side alignment,
instruction tuning (``training.objectives``), one loop for all (``training.trainer``)."""
