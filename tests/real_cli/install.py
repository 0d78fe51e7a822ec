"""Install the pinned real agent CLIs (pins.toml) once; later runs find them cached.

    python tests/real_cli/install.py [NAME ...]     # all by default; prints NAME PATH lines

Node CLIs go into one npm prefix, each Python CLI into a venv of its own, all under
``$OPUS_REAL_CLI_HOME`` (default ``~/.cache/opus-real-cli``). A stamp file per CLI records
the installed version, so a changed pin reinstalls and an unchanged one costs nothing.
Tests call :func:`executable` and skip a CLI that is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

PINS = Path(__file__).with_name("pins.toml")


def home() -> Path:
    default = Path.home() / ".cache" / "opus-real-cli"
    return Path(os.environ.get("OPUS_REAL_CLI_HOME") or default)


def pins() -> dict[str, dict[str, str]]:
    data = tomllib.loads(PINS.read_text())
    out: dict[str, dict[str, str]] = {}
    for registry in ("npm", "pypi"):
        for name, pin in data.get(registry, {}).items():
            out[name] = {**pin, "registry": registry}
    return out


def _bin(name: str, pin: dict[str, str]) -> Path:
    if pin["registry"] == "npm":
        return home() / "npm" / "bin" / pin["bin"]
    return home() / "venvs" / name / "bin" / pin["bin"]


def _stamp(name: str) -> Path:
    return home() / "stamps" / name


def executable(name: str) -> Path | None:
    """The installed CLI at its pinned version, or None."""
    pin = pins()[name]
    path = _bin(name, pin)
    stamp = _stamp(name)
    if path.exists() and stamp.exists() and stamp.read_text().strip() == pin["version"]:
        return path
    return None


def install(name: str) -> Path:
    pin = pins()[name]
    if (found := executable(name)) is not None:
        return found
    spec_version = pin["version"]
    if pin["registry"] == "npm":
        prefix = home() / "npm"
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--global",
                "--prefix",
                str(prefix),
                "--no-fund",
                "--no-audit",
                f"{pin['package']}@{spec_version}",
            ],
            check=True,
        )
    else:
        env_dir = home() / "venvs" / name
        if not (env_dir / "bin" / "python").exists():
            venv.create(env_dir, with_pip=True)
        py = str(env_dir / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        package, _, extras = pin["package"].partition("[")
        req = f"{package}{'[' + extras if extras else ''}=={spec_version}"
        subprocess.run([py, "-m", "pip", "install", "--quiet", req], check=True)
    path = _bin(name, pin)
    if not path.exists():
        raise SystemExit(f"{name}: installed, but {path} is missing")
    _stamp(name).parent.mkdir(parents=True, exist_ok=True)
    _stamp(name).write_text(spec_version + "\n")
    return path


def main(argv: list[str]) -> int:
    names = argv or list(pins())
    for name in names:
        print(name, install(name), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
