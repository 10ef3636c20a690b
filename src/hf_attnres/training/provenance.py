"""Where a trained model came from, for its model card: the base model's Hub id and license.

A converted folder's README (written by the converter) states both in its YAML front matter; the bundled
SmolLM2 GGUF is recognised by name. Unknown stays unknown (None) rather than guessed.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import SMOLLM2_BASE_MODEL, SMOLLM2_GGUF, SMOLLM2_LICENSE
from ..conversion.sources import readme_metadata


def base_model_metadata(source) -> dict:
    """{"base_model", "hub_base_model", "license"} for a `models.ModelSource`."""
    meta = {"base_model": source.base_model, "hub_base_model": None, "license": None}
    if Path(source.base_model).name == SMOLLM2_GGUF:
        meta.update(hub_base_model=SMOLLM2_BASE_MODEL, license=SMOLLM2_LICENSE)
    front = readme_metadata(Path(source.path)) if Path(source.path).is_dir() else {}
    front = {k: v for k, v in front.items() if isinstance(v, str)}  # single values only, as the card takes
    meta["hub_base_model"] = meta["hub_base_model"] or front.get("base_model")
    meta["license"] = meta["license"] or front.get("license")
    if meta["hub_base_model"] is None and not Path(source.base_model).exists():
        meta["hub_base_model"] = source.base_model  # a Hub id
    return meta
