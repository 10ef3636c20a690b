"""The embedded default corpus: real English prose that works offline, under a clear license.

`python-docs-3.11.jsonl` holds the Python 3.11 tutorial, HOWTOs, FAQ and glossary as plain text (41
documents, ~1 MB, ~250k SmolLM2 tokens), PSF License: see LICENSE-python-docs.txt beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

EMBEDDED_CORPUS = Path(__file__).with_name("python-docs-3.11.jsonl")
EMBEDDED_CORPUS_NAME = "python-docs-3.11 (embedded; Python 3.11 documentation prose, PSF License)"
EMBEDDED_CORPUS_LICENSE = "PSF-2.0"


def embedded_corpus() -> list[dict[str, str]]:
    """Documents of the embedded corpus, as ``{"id", "text"}`` dicts in a fixed order."""
    with open(EMBEDDED_CORPUS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["EMBEDDED_CORPUS", "EMBEDDED_CORPUS_LICENSE", "EMBEDDED_CORPUS_NAME", "embedded_corpus"]
