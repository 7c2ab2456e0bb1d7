"""Where the files the package needs beside its code lie: conf/ and the Flower app's project files.

In a checkout (an editable install) they are the checkout's own `conf/`, `pyproject.toml`, `LICENSE` and
`README.md`. A wheel carries copies inside the package (pyproject.toml's `force-include`): `a2v_flower/conf/` and
`a2v_flower/project/`, found through `importlib.resources`. This module imports nothing of the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGE = "a2v_flower"
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root in a checkout; site-packages in a wheel install
PROJECT_FILES = ("pyproject.toml", "LICENSE", "README.md")  # what `flwr run` packs beside the code and conf/
PACKAGED = ("conf", "project")  # the wheel's copies inside the package: left out when the package is copied


def _packaged(*parts: str) -> Path | None:
    """The path `parts` inside the installed package, or None where the package does not hold it (a checkout)."""
    found = resources.files(PACKAGE).joinpath(*parts)
    return Path(str(found)) if found.is_dir() or found.is_file() else None


def conf_dir() -> Path:
    """The Hydra config folder: the wheel's `a2v_flower/conf/`, else the checkout's top-level `conf/`."""
    return _packaged("conf") or CHECKOUT / "conf"


def project_file(name: str) -> Path:
    """One of PROJECT_FILES: the wheel's `a2v_flower/project/<name>`, else the checkout's `<name>`."""
    if name not in PROJECT_FILES:
        raise ValueError(f"project file {name!r} is not one of {list(PROJECT_FILES)}")
    return _packaged("project", name) or CHECKOUT / name


def package_dir() -> Path:
    """The folder of the package's code (the checkout's `a2v_flower/`, or the installed one)."""
    return Path(str(resources.files(PACKAGE)))


CONF_DIR = conf_dir()  # schema.py and the rest take it from there
