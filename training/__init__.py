"""Staged training of anygpt systems (encoder-side alignment, decoder-side alignment, instruction tuning)."""
