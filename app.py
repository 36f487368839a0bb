"""The anygpt chat demo (Gradio). Placeholder until the demo lands: it runs one generation from the command line.

python app.py [--model NAME|DIR]
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print("The Gradio demo is not built yet; use `anygpt generate PROMPT` meanwhile.", file=sys.stderr)
    sys.exit(2)
