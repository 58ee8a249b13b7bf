"""Serving overhead: `vllm bench serve` against bare vLLM, Ray Serve LLM and serve_app, same engine flags.

Rounds alternate the systems (start one, run all its cells, stop it by pid, next) so machine noise hits
all three; each round reverses the order so drift does not favour one system. Reports medians over rounds.

    python -m bench.overhead                 # full matrix: 2 shapes x 3 concurrencies x 3 systems x 2 rounds
    python -m bench.overhead --quick         # one shape, c=1 and c=8, one round, few prompts (a smoke run)
    python -m bench.overhead --systems bare,app,app+throughput-optimized,app+grpc   # Ray fast paths

Before each system starts, the harness waits for a quiet machine (no VLLM:: process anywhere, 1-minute
load average below --max-load) and stores what it saw with the cells; the load before every cell is
stored too (while an engine runs, its busy-polling alone keeps the load near 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.charts import grouped_bars
from bench.common import (
    PYTHON,
    RESULTS,
    command_line,
    machine,
    machine_md,
    md_table,
    median,
    model_dir,
    setup_logging,
    wait_quiet,
    write_json,
)
from bench.systems import ENGINE, Running, fast_path_env, start_system

logger = logging.getLogger("bench.overhead")

SYSTEM_LABELS = {"bare": "bare vLLM", "rayllm": "Ray Serve LLM", "app": "serve_app"}


def label(system: str) -> str:
    """`app+grpc` -> `serve_app + grpc`."""
    name, *paths = system.split("+")
    return " + ".join([SYSTEM_LABELS[name], *paths])


METRICS = ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms")
# num-prompts per (input, output, concurrency): sized so one cell takes roughly 30-60 s on 2 CPU cores
# (about 35 tok/s at c=1, 100 at c=8, 150-180 at c=32), with at least two full waves of requests.
DEFAULT_PROMPTS = {
    (128, 64, 1): 12,
    (128, 64, 8): 48,
    (128, 64, 32): 96,
    (512, 128, 1): 6,
    (512, 128, 8): 24,
    (512, 128, 32): 64,
    (128, 64, 128): 256,
    (512, 128, 128): 256,
}


def num_prompts(inp: int, out: int, conc: int, scale: float) -> int:
    base = DEFAULT_PROMPTS.get((inp, out, conc)) or max(2 * conc, (40 * max(conc, 1) * 3) // max(out, 1))
    return max(conc, round(base * scale))


def bench_argv(run: Running, inp: int, out: int, conc: int, prompts: int, result: Path | None) -> list[str]:
    """Arguments of one `vllm bench serve` cell (what would follow `vllm bench serve` on a command line)."""
    argv = [
        "--backend", "openai-chat",
        "--base-url", run.base_url,
        "--endpoint", "/v1/chat/completions",
        "--model", run.model,
        "--tokenizer", str(model_dir()),
        "--dataset-name", "random",
        "--random-input-len", str(inp),
        "--random-output-len", str(out),
        "--num-prompts", str(prompts),
        "--max-concurrency", str(conc),
        "--ignore-eos",
        "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--disable-tqdm",
    ]  # fmt: skip
    if result is not None:
        argv += ["--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    return argv


def run_batch(cells: list[list[str]], work: Path, tag: str) -> list[list[float]]:
    """All cells of one system in one `bench.vllm_bench --batch` process (vLLM's import costs ~20 s)."""
    batch = work / f"batch-{tag}.json"
    batch.write_text(json.dumps(cells))
    log = work / f"bench-{tag}.log"
    with log.open("w") as f:
        proc = subprocess.run(
            [PYTHON, "-m", "bench.vllm_bench", "--batch", str(batch)], stdout=f, stderr=subprocess.STDOUT, timeout=3600
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"vllm bench serve batch failed ({proc.returncode}):\n{tail}")
    loads = batch.with_suffix(".load.json")  # bench.vllm_bench writes the load average before each cell
    return list(json.loads(loads.read_text())) if loads.exists() else []


def read_cell(path: Path, argv: list[str], prompts: int) -> dict[str, Any]:
    raw = json.loads(path.read_text())
    cell = {k: raw.get(k) for k in METRICS}
    cell.update(
        completed=raw.get("completed"),
        failed=raw.get("failed", 0),
        duration_s=raw.get("duration"),
        num_prompts=prompts,
        command="vllm bench serve " + " ".join(a for a in argv if not a.startswith("/tmp")),
    )
    return cell


def run_system(
    name: str, cells: list[tuple[int, int, int]], args: argparse.Namespace, work: Path, rnd: int
) -> list[dict[str, Any]]:
    quiet = wait_quiet(args.max_load, args.quiet_wait)
    started = time.monotonic()
    run = start_system(name, work)
    startup_s = time.monotonic() - started
    plan: list[tuple[Path, list[str], int, tuple[int, int, int]]] = []
    for inp, out, conc in cells:
        prompts = num_prompts(inp, out, conc, args.scale)
        path = work / f"{name}-r{rnd}-{inp}x{out}-c{conc}.json"
        plan.append((path, bench_argv(run, inp, out, conc, prompts, path), prompts, (inp, out, conc)))
    # Warm-up first: the first requests pay one-off costs (tokenizer caches, Serve handle set-up).
    argvs = [bench_argv(run, 128, 16, 4, 8, None)] + [a for _, a, _, _ in plan]
    t0 = time.monotonic()
    try:
        loads = run_batch(argvs, work, f"{name}-r{rnd}")
    finally:
        run.server.stop()
    records = []
    for i, (path, argv, prompts, (inp, out, conc)) in enumerate(plan):
        cell = read_cell(path, argv, prompts)
        cell.update(
            system=name, round=rnd, input_len=inp, output_len=out, concurrency=conc, startup_s=round(startup_s, 1)
        )
        cell.update(quiet_before_start=quiet, load_before_cell=loads[i + 1] if i + 1 < len(loads) else None)
        cell["env"] = fast_path_env(name) if name.startswith("app") else {}
        logger.info(
            "%s r%d %dx%d c=%d: %.1f tok/s, TTFT p50 %.0f ms, ITL p50 %.1f ms (%.0f s)",
            name,
            rnd,
            inp,
            out,
            conc,
            cell["output_throughput"],
            cell["p50_ttft_ms"],
            cell["p50_itl_ms"],
            cell["duration_s"],
        )
        records.append(cell)
    logger.info("%s round %d: started in %.0f s, cells took %.0f s", name, rnd, startup_s, time.monotonic() - t0)
    return records


def summarize(records: list[dict[str, Any]], systems: list[str]) -> list[dict[str, Any]]:
    keys = sorted({(r["input_len"], r["output_len"], r["concurrency"]) for r in records})
    rows = []
    for inp, out, conc in keys:
        row: dict[str, Any] = {"input_len": inp, "output_len": out, "concurrency": conc}
        for s in systems:
            mine = [
                r
                for r in records
                if r["system"] == s and (r["input_len"], r["output_len"], r["concurrency"]) == (inp, out, conc)
            ]
            for m in METRICS:
                row[f"{s}.{m}"] = median([r[m] for r in mine if r.get(m) is not None])
            row[f"{s}.failed"] = sum(int(r.get("failed") or 0) for r in mine)
            row[f"{s}.rounds"] = len(mine)
        rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def targets(rows: list[dict[str, Any]], systems: list[str]) -> list[dict[str, Any]]:
    """Issue 13's targets, per serve_app variant and cell: throughput ≥ 0.97 x bare at c = 8/32 (and
    shown at c >= 8), ITL p50 ≤ 1.05 x bare, TTFT p50 at c = 1 ≤ bare + 5 ms; plus the earlier
    ≥ 1.10 x Ray Serve LLM."""
    out = []
    for app in (s for s in systems if s.startswith("app")):
        for r in rows:
            cell = f"{label(app)}: {r['input_len']}→{r['output_len']} c={r['concurrency']}"
            tput = _ratio(r.get(f"{app}.output_throughput"), r.get("bare.output_throughput"))
            vs_ray = _ratio(r.get(f"{app}.output_throughput"), r.get("rayllm.output_throughput"))
            itl = _ratio(r.get(f"{app}.p50_itl_ms"), r.get("bare.p50_itl_ms"))
            if r["concurrency"] >= 8:
                out.append({"cell": cell, "target": "throughput ≥ 0.97 x bare", "value": tput,
                            "met": tput is not None and tput >= 0.97})  # fmt: skip
                if vs_ray is not None:
                    out.append({"cell": cell, "target": "throughput ≥ 1.10 x Ray Serve LLM", "value": vs_ray,
                                "met": vs_ray >= 1.10})  # fmt: skip
            out.append({"cell": cell, "target": "ITL p50 ≤ 1.05 x bare", "value": itl,
                        "met": itl is not None and itl <= 1.05})  # fmt: skip
            if r["concurrency"] == 1:
                a, b = r.get(f"{app}.p50_ttft_ms"), r.get("bare.p50_ttft_ms")
                extra = None if a is None or b is None else a - b
                out.append({"cell": cell, "target": "TTFT p50 ≤ bare + 5 ms (value: + ms)", "value": extra,
                            "met": extra is not None and extra <= 5.0})  # fmt: skip
    return out


def rounds_of(records: list[dict[str, Any]]) -> list[int]:
    return sorted({int(r["round"]) for r in records})


def round_ratios(records: list[dict[str, Any]], systems: list[str]) -> list[list[Any]]:
    """Output throughput of each non-bare system over bare's, per cell and round."""
    by = {(r["system"], r["round"], r["input_len"], r["output_len"], r["concurrency"]): r for r in records}
    cells = sorted({(r["input_len"], r["output_len"], r["concurrency"]) for r in records})
    out = []
    for inp, outl, conc in cells:
        for s in (s for s in systems if s != "bare"):
            ratios = []
            for n in rounds_of(records):
                mine, bare = by.get((s, n, inp, outl, conc)), by.get(("bare", n, inp, outl, conc))
                ratios.append(_ratio(mine and mine["output_throughput"], bare and bare["output_throughput"]))
            out.append([f"{inp}→{outl} c={conc}", label(s), *ratios])
    return out


def markdown(
    rows: list[dict[str, Any]],
    systems: list[str],
    checks: list[dict[str, Any]],
    meta: dict[str, Any],
    records: list[dict[str, Any]],
) -> str:
    head = [
        "shape",
        "c",
        "system",
        "output tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "tok/s vs bare",
        "tok/s vs Ray Serve LLM",
        "failed",
    ]
    body = []
    for r in rows:
        for s in systems:
            body.append(
                [
                    f"{r['input_len']}→{r['output_len']}",
                    r["concurrency"],
                    label(s),
                    r.get(f"{s}.output_throughput"),
                    r.get(f"{s}.p50_ttft_ms"),
                    r.get(f"{s}.p99_ttft_ms"),
                    r.get(f"{s}.p50_itl_ms"),
                    r.get(f"{s}.p99_itl_ms"),
                    _ratio(r.get(f"{s}.output_throughput"), r.get("bare.output_throughput")),
                    _ratio(r.get(f"{s}.output_throughput"), r.get("rayllm.output_throughput")),
                    r.get(f"{s}.failed"),
                ]
            )
    check_rows = [[c["cell"], c["target"], c["value"], "met" if c["met"] else "NOT met"] for c in checks]
    return "\n".join(
        [
            "# Overhead: serve_app vs bare vLLM vs Ray Serve LLM",
            "",
            f"Medians over {meta['rounds']} alternating round(s); `vllm bench serve --backend openai-chat "
            f"--dataset-name random --ignore-eos`, SmolLM2-135M-Instruct {meta.get('dtype', 'bfloat16')}, PyTorch "
            "rotary embedding (custom_ops all,-rotary_embedding), enforce_eager, max_model_len 2048, "
            f"VLLM_CPU_KVCACHE_SPACE={meta['kv_gib']} for every system; one replica each. Load average before "
            f"each system started: {meta.get('quiet_summary', 'not recorded')}.",
            "",
            md_table(head, body),
            "",
            "## Throughput vs bare, per round",
            "",
            "The medians above mix rounds; the machine drifts between them. Each round's ratio compares "
            "systems that ran minutes apart in the same round:",
            "",
            md_table(["cell", "system", *[f"round {n}" for n in rounds_of(records)]], round_ratios(records, systems)),
            "",
            "## Targets",
            "",
            md_table(["cell", "target", "ratio (TTFT: ms over bare)", "result"], check_rows),
            "",
            machine_md(meta["machine"], meta["command"], meta["notes"]),
        ]
    )


def render(run_json: Path, notes: list[str]) -> None:
    """Rewrite summary.md (and the JSON's notes) from a saved run: the tables, never the measurements."""
    doc = json.loads(run_json.read_text())
    doc["notes"] = [*doc.get("notes", []), *notes]
    records = doc["cells"]
    systems = list(dict.fromkeys(r["system"] for r in sorted(records, key=lambda r: r["round"])))
    doc["summary"] = summarize(records, systems)
    doc["targets"] = targets(doc["summary"], systems) if "bare" in systems else []
    write_json(run_json, doc)
    md = markdown(doc["summary"], systems, doc["targets"], doc, records)
    (run_json.parent / "summary.md").write_text(md + f"\nTotal duration: {doc['duration_s']} s.\n")
    print(md)


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--systems", default="bare,rayllm,app", help="comma list of bare, rayllm, app, app+<Ray fast path>[+...]"
    )
    p.add_argument("--dtype", default=ENGINE["dtype"], help="engine dtype for every system (default: CPU-native)")
    p.add_argument("--max-load", type=float, default=1.0, help="quiet machine: 1-min load below this")
    p.add_argument("--quiet-wait", type=float, default=300.0, help="wait at most this long for a quiet machine")
    p.add_argument("--shapes", default="128x64,512x128", help="comma list of INPUTxOUTPUT token lengths")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma list of max concurrency values")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every cell's num-prompts")
    p.add_argument("--quick", action="store_true", help="128x64 at c=1 and 8, one round, a third of the prompts")
    p.add_argument("--out", type=Path, default=RESULTS / "overhead")
    p.add_argument("--note", action="append", default=[], help="a note to record with the results")
    p.add_argument("--render", type=Path, help="only re-render summary.md next to a saved run JSON (+ --note)")
    args = p.parse_args()
    if args.render:
        render(args.render, args.note)
        return
    if args.quick:
        args.shapes, args.concurrency, args.rounds, args.scale = "128x64", "1,8", 1, 0.34
    ENGINE["dtype"] = args.dtype
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if "rayllm" in systems and importlib.util.find_spec("pyarrow") is None:
        p.error("Ray Serve LLM needs pyarrow: pip install -r bench/requirements.txt (or drop rayllm from --systems)")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    cells = [(i, o, c) for i, o in shapes for c in (int(x) for x in args.concurrency.split(","))]
    meta: dict[str, Any] = {
        "machine": machine(),
        "command": command_line(),
        "rounds": args.rounds,
        "kv_gib": 2,
        "dtype": args.dtype,
    }
    meta["notes"] = list(args.note)  # say with --note what else ran on the machine
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = Path(tmp)
        for rnd in range(1, args.rounds + 1):
            order = systems if rnd % 2 else list(reversed(systems))
            for name in order:
                try:
                    records += run_system(name, cells, args, work, rnd)
                except RuntimeError as err:  # one system failing must not lose the others' cells
                    failure = {"system": name, "round": rnd, "error": str(err)[-500:]}
                    logger.error("system failed: %s", failure)
                    meta.setdefault("failed_systems", []).append(failure)
        meta["logs_tail"] = {}
    meta["duration_s"] = round(time.monotonic() - started)
    rows = summarize(records, systems)
    quiet = {f"{r['system']} r{r['round']}": r["quiet_before_start"]["load_average"][0] for r in records}
    meta["quiet_summary"] = ", ".join(f"{k} {v}" for k, v in quiet.items())
    checks = targets(rows, systems) if "bare" in systems else []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(args.out / f"run-{stamp}.json", {**meta, "cells": records, "summary": rows, "targets": checks})
    md = markdown(rows, systems, checks, meta, records)
    (args.out / "summary.md").write_text(md + f"\nTotal duration: {meta['duration_s']} s.\n")
    grouped_bars(
        args.out / "throughput.png",
        [f"{r['input_len']}→{r['output_len']}\nc={r['concurrency']}" for r in rows],
        {label(s): [r.get(f"{s}.output_throughput") or 0.0 for r in rows] for s in systems},
        "output tokens/s (median over rounds)",
        "Output throughput: bare vLLM vs Ray Serve LLM vs serve_app",
    )
    print(md)


if __name__ == "__main__":
    main()
