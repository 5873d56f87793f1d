"""The package as a user installs it: built into a wheel, installed into a fresh virtual environment (which
reuses this environment's dependencies, not its editable emoq), and used from an empty folder."""

import json
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from support.environment import tail

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(the installed `emoq` command, the fresh environment's python) of a wheel built from this checkout."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy of the sources, so the build leaves no build/ or egg-info folder in the checkout
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "demo_out", "results", ".torch_extensions", "__pycache__",
        ".pytest_cache", ".ruff_cache", ".cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, tail(build.stderr)
    (wheel,) = (root / "dist").glob("emoq-*.whl")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this environment's site-packages as a plain path entry: its dependencies import, while the editable
    # emoq it holds (hooked in by a .pth file that only its own interpreter processes) does not
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "emoq_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, tail(install.stderr)
    return env / "bin" / "emoq", python


def _run(command, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(command), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)}: rc={proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    return proc


@pytest.mark.slow
def test_an_installed_wheel_lists_copies_validates_and_builds_the_demo_data(wheel_env, tmp_path):
    emoq, python = wheel_env
    where = subprocess.run([str(python), "-c", "import emoq; print(emoq.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(python.parent.parent), where  # the wheel's copy, not this checkout
    listing = _run(emoq, tmp_path, "ls").stdout
    assert "stage2_llm" in listing and "--config emoq/demo_cpu" in listing and "qieemo/tiny_test" in listing
    _run(emoq, tmp_path, "cp", "emoq/demo_cpu", "x.yaml")
    _run(emoq, tmp_path, "cp", "stage2_llm", ".")
    assert (tmp_path / "x.yaml").read_text() == (REPO / "configs/emoq/demo_cpu.yaml").read_text()
    assert "class Stage2LLM" in (tmp_path / "stage2_llm.py").read_text()
    checked = _run(emoq, tmp_path, "validate").stdout
    assert checked.count("ok ") >= 11 and "error" not in checked, checked
    _run(emoq, tmp_path, "validate", "x.yaml")
    _run(emoq, tmp_path, "demo", "--only-data", "--out", "demo")
    assert len(list((tmp_path / "demo/corpus/output_repeated_splits_test").glob("*.wav"))) > 0
    _run(emoq, tmp_path, "demo", "--only-data", "--format", "hf", "--out", "demo")  # the corpus as a datasets folder
    splits = json.loads((tmp_path / "demo/corpus_hf/dataset_dict.json").read_text())["splits"]
    assert sorted(splits) == ["test", "train", "validation"]
