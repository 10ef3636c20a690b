"""Run the release-sensitive tests on every transformers minor release we support (`make test-releases`).

`make test` checks the oldest supported release and the newest; this walks everything between, installing each
into the environment it runs in (`make test-releases` builds `.venv-releases` for it), and prints one line per
release. Needs PyPI (pip install).

    .venv-releases/bin/python tests/release_matrix.py tests/test_generation.py ... [--releases 5.17.0 5.25.0]
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
    args = parser.parse_args()

    python = sys.executable
    pip = [python, "-m", "pip", "install", "-q"]
    releases = args.releases or supported_releases([python, "-m", "pip"])
    print(f"transformers releases: {', '.join(releases)}", flush=True)

    failed = []
    for release in releases:
        subprocess.run([*pip, f"transformers=={release}"], check=True)
        run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests],
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
