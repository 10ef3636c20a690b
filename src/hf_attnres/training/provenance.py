"""Where a trained model came from, for its model card: the base model's Hub id and license.

A converted folder's README (written by the converter) states both in its YAML front matter; the bundled
SmolLM2 GGUF is recognised by name. Unknown stays unknown (None) rather than guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..assets import SMOLLM2_BASE_MODEL, SMOLLM2_GGUF, SMOLLM2_LICENSE


def _front_matter(folder: Path) -> dict[str, str]:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    match = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8"), re.S)
    if not match:
        return {}
    fields = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith((" ", "-")) and value.strip():
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def base_model_metadata(source) -> dict:
    """{"base_model", "hub_base_model", "license"} for a `models.ModelSource`."""
    meta = {"base_model": source.base_model, "hub_base_model": None, "license": None}
    if Path(source.base_model).name == SMOLLM2_GGUF:
        meta.update(hub_base_model=SMOLLM2_BASE_MODEL, license=SMOLLM2_LICENSE)
    front = _front_matter(Path(source.path)) if Path(source.path).is_dir() else {}
    meta["hub_base_model"] = meta["hub_base_model"] or front.get("base_model")
    meta["license"] = meta["license"] or front.get("license")
    if meta["hub_base_model"] is None and not Path(source.base_model).exists():
        meta["hub_base_model"] = source.base_model  # a Hub id
    return meta
