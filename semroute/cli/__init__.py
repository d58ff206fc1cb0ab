"""The ``semroute`` command.

Each area registers its own sub-commands (``register(top, groups)``) so this module stays a table.
Handlers import their heavy dependencies lazily: ``semroute --help`` loads neither onnxruntime
nor grpc.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semroute.errors import SemrouteError

if TYPE_CHECKING:
    from semroute.config import Settings

# Modules that contribute commands; each has register(top, groups).
_COMMAND_MODULES = (
    "semroute.cli.core",  # encoder export, index build, route
    "semroute.cli.static_cmds",  # encoder distill (the two-stage encoder's static model)
    "semroute.cli.tune_cmds",  # encoder tune
    "semroute.cli.router_cmds",  # serve router
    "semroute.cli.dispatch_cmds",  # serve dispatcher, chat
    "semroute.cli.eval_cmds",  # eval labels/outcomes, calibrate, index lint
    "semroute.cli.loop_cmds",  # learn
)

# Command groups shared by several modules (e.g. `serve router` and `serve dispatcher`).
_GROUPS = {
    "encoder": "export or fine-tune the sentence encoder",
    "index": "build and check exemplar indexes",
    "serve": "run a gRPC service",
    "eval": "measure routing quality",
}


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings from the ``--config`` file (when given) with flag overrides on top; overrides
    left at None (flag not given) are skipped."""
    from semroute.config import load_settings

    config = getattr(args, "config", None)
    given = {k: v for k, v in overrides.items() if v is not None}
    return load_settings(Path(config) if config else None, **given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semroute", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=str, default=None, help="YAML settings file")
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, help_text in _GROUPS.items():
        p = top.add_parser(name, help=help_text)
        groups[name] = p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue  # area not built yet
            raise
        module.register(top, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except SemrouteError as exc:
        print(f"semroute: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
