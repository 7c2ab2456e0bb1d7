"""The package works as a wheel, with no checkout beside it: conf/, the project files `flwr run` packs and the sweep
report travel inside it (a2v_flower/resources.py), and `a2v-run` runs from any folder."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from a2v_flower import resources
from a2v_flower.run import free_port
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_finds_its_own_conf_and_project_files():
    """In a checkout (an editable install) nothing is read from copies: conf/ and pyproject.toml are the checkout's."""
    assert resources.conf_dir() == ROOT / "conf"
    assert resources.project_file("pyproject.toml") == ROOT / "pyproject.toml"
    with pytest.raises(ValueError, match="project file 'setup.py' is not one of"):
        resources.project_file("setup.py")


def build_wheel(out: Path) -> Path:
    """`pip wheel` of this checkout (hatchling, as pyproject.toml says) into `out`; the wheel's path."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    return next(out.glob("a2v_flower-*.whl"))


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new venv holding the wheel (and flwr, for its command-line tools), that sees the dev venv's other
    dependencies through a .pth file; the dev venv's editable a2v_flower is not on its path (a .pth file in a
    folder that a .pth file adds is not read). Its bin/ folder."""
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter the dev venv was made from
    subprocess.run([base, "-m", "venv", str(folder)], check=True, timeout=300)
    py = folder / "bin" / "python"
    fresh_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                check=True, capture_output=True, text=True).stdout.strip()
    (Path(fresh_site) / "dev_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    flwr = f"flwr=={metadata.version('flwr')}"
    # --ignore-installed: pip sees the dev venv's flwr through the .pth file and would skip its command-line tools
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel), flwr],
                   check=True, capture_output=True, text=True, timeout=600)
    return folder / "bin"


@pytest.mark.slow
def test_the_wheel_runs_with_no_checkout_beside_it(tmp_path, cache_dir):
    wheel = build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"a2v_flower/conf/config.yaml", "a2v_flower/sweep_report.py", "a2v_flower/project/pyproject.toml",
            "a2v_flower/project/LICENSE", "a2v_flower/project/README.md"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "conf/"))]

    bin_dir = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"  # no checkout here or above: pytest's temp folder
    elsewhere.mkdir()
    where = subprocess.run([str(bin_dir / "python"), "-c", "import a2v_flower.schema as s, a2v_flower as a; "
                            "print(a.__file__); print(s.CONF_DIR)"], check=True, capture_output=True, text=True,
                           cwd=elsewhere).stdout.split()
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where  # the wheel's, not the checkout's

    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr"), FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    helped = subprocess.run([str(bin_dir / "a2v-run"), "--help"], capture_output=True, text=True, timeout=120,
                            cwd=elsewhere, env=env)
    assert helped.returncode == 0 and "granularity" in helped.stdout, helped.stderr[-2000:]

    run = subprocess.run([str(bin_dir / "a2v-run"), *TINY, "num_rounds=1", "federation.num_sites=2",
                          "diffusion.render_every=0", "wandb.mode=disabled", f"paths.cache_dir={cache_dir}",
                          f"paths.output_root={tmp_path / 'outputs'}"],
                         capture_output=True, text=True, timeout=900, cwd=elsewhere, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "final top-1 retrieval" in run.stdout.strip().splitlines()[-1]
    summary = json.loads(next((tmp_path / "outputs").rglob("summary.json")).read_text())
    assert summary["completed"] and summary["rounds_done"] == 1


def test_the_staged_app_has_the_checkouts_layout(tmp_path):
    """What `flwr run` is handed: the code, conf/ and the project files at the top, no copies of them in the code."""
    from a2v_flower.run import stage_app

    app = stage_app(tmp_path / "app")
    assert {p.name for p in app.iterdir()} == {"a2v_flower", "conf", "pyproject.toml", "LICENSE", "README.md"}
    assert (app / "conf" / "config.yaml").is_file() and (app / "a2v_flower" / "sweep_report.py").is_file()
    assert not {"conf", "project", "__pycache__"} & {p.name for p in (app / "a2v_flower").iterdir()}
