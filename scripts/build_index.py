"""Rebuild an index from exemplar CSVs: a thin wrapper over `semroute index build`.

    .venv/bin/python scripts/build_index.py --exemplars index_data/exemplars.csv \
        --routes index_data/routes.yaml --out index_data/build/default
"""

import sys

from semroute.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", "build", *sys.argv[1:]]))
