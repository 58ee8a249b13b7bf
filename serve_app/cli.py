"""`serve-app` console script: validate-config, run, and the operator tools (plan, cost, trace).

Each tool module exposes `register(subparsers)`, which adds its sub-command with `func=handler`, where
`handler(args) -> int` returns the exit code (2 for bad input).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from serve_app.config import ConfigError, load_config

# Modules that add sub-commands; a module that is not there yet is skipped.
_TOOL_MODULES = (
    "serve_app.runner",
    "serve_app.plan_cli",
    "serve_app.cost_cli",
    "serve_app.trace",
    "serve_app.model_prep",
)


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as err:
            print(err, file=sys.stderr)
            status = 2
            continue
        routes = cfg.effective_routes()
        print(f"{path}: ok ({len(cfg.pools)} pool(s): {', '.join(cfg.pools)}; routes: {', '.join(routes)})")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate-config", help="check config files without starting anything")
    p.add_argument("files", nargs="+", help="YAML config files")
    p.set_defaults(func=_validate)
    for name in _TOOL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
