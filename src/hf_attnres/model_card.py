"""Model cards (`README.md`) for the AttnRes folders this project writes (conversion, training).

One writer so every folder states the same things the Hub needs: `base_model` metadata (links the model to
its origin on the Hub), the license, how to load it, the settings that produced it and its measured figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from huggingface_hub import ModelCardData

DEFAULT_TAGS = ("attnres", "attention-residuals", "custom_code")
PAPER_URL = "https://arxiv.org/abs/2603.15031"


def markdown_table(
    rows: Mapping[str, object] | Sequence[Sequence[object]], header: Sequence[str] = ("setting", "value")
) -> str:
    """A Markdown table from a mapping (two columns) or from rows of cells; `|` in cells is escaped."""
    items = list(rows.items()) if isinstance(rows, Mapping) else [tuple(r) for r in rows]

    def cell(value: object) -> str:
        return ("-" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in items]
    return "\n".join(lines)


def render_model_card(
    *,
    title: str,
    summary: str,
    settings: Mapping[str, object],
    model_id: str = "path/to/this/folder",
    base_model: str | None = None,
    license: str | None = None,
    figures: str | None = None,
    tags: Sequence[str] = (),
) -> str:
    """The text of a `README.md`: YAML front matter, summary, how to load, a settings table, figures.

    `figures` is free-form Markdown (verification or evaluation results). `license=None` says the license
    is unknown rather than guessing one: the user must fill it in before publishing.
    """
    data = ModelCardData(
        base_model=base_model,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
    )
    parts = [
        f"---\n{data.to_yaml()}\n---",
        f"# {title}",
        summary.strip(),
        "## How to load",
        "The model code ships in this folder (`modeling_attnres.py`, `configuration_attnres.py`), so "
        "transformers loads it with `trust_remote_code=True` and nothing else installed:",
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}", trust_remote_code=True)\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}", trust_remote_code=True)\n'
        "```",
        "(The tokenizer is a standard one; `AutoTokenizer` reads the folder's config first, whose custom model "
        "type needs the flag too, or it stops to ask.)",
        "With `pip install hf-attnres` and `import hf_attnres`, the same call works without "
        "`trust_remote_code` (the installed code is used).",
        "## Settings",
        markdown_table(settings),
    ]
    if figures:
        parts += ["## Figures", figures.strip()]
    parts += [
        "## License",
        f"`{license}`, as the base model."
        if license
        else "Unknown: the source did not state a license. "
        "Check the base model's terms before using or sharing this model.",
        "## Method",
        f"Attention Residuals (AttnRes), Kimi Team, [arXiv 2603.15031]({PAPER_URL}): each sublayer reads a "
        "softmax-weighted mix of earlier sublayer (or block) outputs, weighted by a learned pseudo-query, "
        "instead of their plain sum.",
    ]
    return "\n\n".join(parts) + "\n"


__all__ = ["markdown_table", "render_model_card"]
