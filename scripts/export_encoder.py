"""Export the sentence encoder to ONNX: a thin wrapper over `semroute encoder export`.

    .venv/bin/python scripts/export_encoder.py [--model DIR] [--out DIR] [--int8]
"""

import sys

from semroute.cli import main

if __name__ == "__main__":
    sys.exit(main(["encoder", "export", *sys.argv[1:]]))
