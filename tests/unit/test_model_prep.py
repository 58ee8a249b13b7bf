"""model_prep without the 30 s conversion: the marker, the lock, the cache location and the CLI.

The conversion itself runs for real in tests/integration/test_vllm_engine.py (on a fresh cache).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from serve_app import cli
from serve_app.ops import model_prep


def fake_prepared(target: Path) -> Path:
    """A folder that carries the marker: what a finished preparation leaves behind."""
    target.mkdir(parents=True)
    (target / model_prep.MARKER).write_text("test\n")
    return target


def test_prepared_folder_is_returned_without_rebuilding(tmp_path: Path) -> None:
    target = fake_prepared(tmp_path / "models" / "m")
    started = time.monotonic()
    assert model_prep.prepare_smollm2(target) == target.resolve()
    assert time.monotonic() - started < 1.0
    # Nothing was converted or replaced: the folder holds only the marker.
    assert sorted(p.name for p in target.iterdir()) == [model_prep.MARKER]


def test_waits_for_the_lock_holder_and_reuses_its_result(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    result: list[Path] = []
    with model_prep._file_lock(model_prep.lock_path(target)):
        waiter = threading.Thread(target=lambda: result.append(model_prep.prepare_smollm2(target)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "a second preparer must wait while another one holds the lock"
        # The holder finishes its build while the waiter is blocked.
        fake_prepared(target)
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert result == [target.resolve()]
    assert sorted(p.name for p in target.iterdir()) == [model_prep.MARKER]


def test_lock_file_lives_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert model_prep.lock_path(target) == tmp_path / "models" / ".SmolLM2-135M-Instruct.lock"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ("/srv/cache", Path("/srv/cache/models/SmolLM2-135M-Instruct")),
        (None, Path.home() / ".cache" / "serve_app" / "models" / "SmolLM2-135M-Instruct"),
        ("", Path.home() / ".cache" / "serve_app" / "models" / "SmolLM2-135M-Instruct"),
    ],
)
def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: Path) -> None:
    if env is None:
        monkeypatch.delenv("SERVE_APP_CACHE", raising=False)
    else:
        monkeypatch.setenv("SERVE_APP_CACHE", env)
    assert model_prep.default_model_dir() == expected


def test_bundled_gguf_is_found() -> None:
    folder, name = model_prep.gguf_source()
    assert (folder / name).stat().st_size > 50_000_000


def test_module_cli_prints_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_prepared(tmp_path / "m")
    assert model_prep.main(["--target", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())


def test_serve_app_prepare_model_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = fake_prepared(tmp_path / "m")
    assert cli.main(["prepare-model", "--target", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())
