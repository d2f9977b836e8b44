"""Find the study folders of ``experiments/`` and run one as a subprocess (the library never imports them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import deltactl

ENV_ROOT = "DELTACTL_EXPERIMENTS"


@dataclass(frozen=True)
class Study:
    """One ``experiments/NAME/`` folder: ``config.json`` (description, quick and full settings) and ``run.py``."""

    name: str
    folder: Path
    description: str
    config: dict

    @property
    def script(self) -> Path:
        return self.folder / "run.py"

    @property
    def committed(self) -> Path:
        """Where the committed full-mode results live."""
        return self.folder / "results" / "results.json"


def experiments_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$DELTACTL_EXPERIMENTS``, else the ``experiments/`` folder beside the installed package."""
    path = Path(root or os.environ.get(ENV_ROOT) or Path(deltactl.__file__).resolve().parents[1] / "experiments")
    if not path.is_dir():
        raise FileNotFoundError(
            f"experiments folder {path} does not exist; pass --root DIR (a folder of NAME/config.json + NAME/run.py) "
            f"or set ${ENV_ROOT}"
        )
    return path


def discover(root: str | os.PathLike | None = None) -> dict[str, Study]:
    """Every ``NAME/`` under the root that has both ``config.json`` and ``run.py``, by name.

    A folder with a broken ``config.json`` is an error naming the file (a study that silently vanishes from
    the list would be worse).
    """
    studies = {}
    for folder in sorted(experiments_root(root).iterdir()):
        if not (folder.is_dir() and (folder / "config.json").is_file() and (folder / "run.py").is_file()):
            continue
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
        missing = [key for key in ("description", "quick", "full") if key not in config]
        if missing:
            raise ValueError(
                f"{folder / 'config.json'} lacks {', '.join(missing)}; a study config has "
                '{"description": "...", "quick": {...}, "full": {...}}'
            )
        studies[folder.name] = Study(folder.name, folder, config["description"], config)
    return studies


def get_study(name: str, root: str | os.PathLike | None = None) -> Study:
    studies = discover(root)
    if name not in studies:
        known = ", ".join(studies) or "none"
        raise ValueError(f"no study {name!r} in {experiments_root(root)}; studies: {known}")
    return studies[name]


def load_script(name: str, root: str | os.PathLike | None = None):
    """A study's run.py as a module (its measure, plot and helpers; ``main`` runs only under ``__main__``), for a
    study that reads another's runs, and for tests."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"study_{name}", get_study(name, root).script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(study: Study, quick: bool = False, out=None, data=None, plot_only: bool = False,
            extra: list[str] | tuple = ()) -> list[str]:
    """The command line that runs a study's script with the standard flags."""
    argv = [sys.executable, str(study.script)]
    argv += ["--quick"] * quick + ["--plot-only"] * plot_only
    # absolute paths: the script runs in its own folder, the user's relative paths mean the caller's folder
    argv += ["--out", str(Path(out).resolve())] if out else []
    argv += ["--data", str(Path(data).resolve())] if data else []
    return argv + list(extra)


def run_study(name: str, quick: bool = False, out=None, data=None, plot_only: bool = False,
              extra: list[str] | tuple = (), root=None) -> int:
    """Run ``experiments/NAME/run.py`` in a subprocess (its output streams through); returns its exit code.

    The package's parent folder goes first on ``PYTHONPATH`` so the script imports this very deltactl.
    """
    study = get_study(name, root)
    env = dict(os.environ)
    package_parent = str(Path(deltactl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return subprocess.run(command(study, quick, out, data, plot_only, extra), env=env, cwd=study.folder).returncode
