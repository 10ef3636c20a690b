"""Run the release-sensitive tests on every transformers minor release we support (`make test-releases`).

`make test` checks the oldest supported release and the newest; this walks everything between, in its own
environment (`.venv-releases`), and prints one line per release. Needs PyPI (pip install).

    python tests/release_matrix.py [--releases 5.17.0 5.25.0] tests/test_generation.py ...
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def lower_bound() -> Version:
    return Version(re.search(r"transformers>=([\d.]+)", (ROOT / "setup.cfg").read_text()).group(1))


def supported_releases(pip: list[str]) -> list[str]:
    """The newest patch of every minor release from setup.cfg's lower bound to the newest on PyPI."""
    out = subprocess.run([*pip, "index", "versions", "transformers"], capture_output=True, text=True, check=True)
    listed = re.search(r"Available versions: (.*)", out.stdout).group(1).split(", ")
    versions = [v for v in map(Version, listed) if v >= lower_bound() and not v.is_prerelease]
    newest: dict[tuple[int, int], Version] = {}
    for v in versions:
        newest[v.release[:2]] = max(v, newest.get(v.release[:2], v))
    return [str(v) for _, v in sorted(newest.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="+", help="test files to run on each release")
    parser.add_argument("--releases", nargs="*", help="transformers versions (default: see supported_releases)")
    parser.add_argument("--python", default="python3", help="interpreter to build the environment with")
    parser.add_argument("--torch", default="torch==2.13.0", help="torch requirement of the environment")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-releases")
    args = parser.parse_args()

    python = args.venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    if not (args.venv / ".done").exists():
        subprocess.run([args.python, "-m", "venv", str(args.venv)], check=True)
        subprocess.run([*pip, args.torch], check=True)
        subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
        (args.venv / ".done").touch()
    releases = args.releases or supported_releases([str(python), "-m", "pip"])
    print(f"transformers releases: {', '.join(releases)}", flush=True)

    failed = []
    for release in releases:
        subprocess.run([*pip, f"transformers=={release}"], check=True)
        run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests],
                             cwd=ROOT, capture_output=True, text=True)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()[-200:]
        print(f"transformers {release}: {summary}", flush=True)
        for line in run.stdout.splitlines():
            if line.startswith(("FAILED", "ERROR")):
                print(f"    {line}", flush=True)
        if run.returncode != 0:
            failed.append(release)
    print(f"{len(releases) - len(failed)} of {len(releases)} releases pass" + (f"; failing: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
