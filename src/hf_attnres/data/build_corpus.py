"""Rebuild the embedded corpus from Debian's ``python3.11-doc`` reST sources (PSF License).

The corpus is prose (tutorial, HOWTOs, FAQ, glossary) turned into plain text: reST directives, labels and
section underlines are dropped, roles such as :func:`len` become `len`. One document per source file.
Run ``apt-get install python3.11-doc`` first, then ``python -m hf_attnres.data.build_corpus``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ("tutorial", "howto", "faq", "glossary.rst.txt")
SKIP = {"index.rst.txt", "clinic.rst.txt", "instrumentation.rst.txt", "isolating-extensions.rst.txt"}
OUT = Path(__file__).with_name("python-docs-3.11.jsonl")

_ROLE = re.compile(r":[\w:+-]+:`(?:~|!)?([^`<]*?)(?:\s*<[^>]*>)?`")
_UNDERLINE = re.compile(r"^\s*([=\-~*^\"'#+`.])\1{3,}\s*$")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
# Directives (and comments, which have no "::") whose indented body is markup, not prose.
_DROP_BODY = re.compile(
    r"^\s*\.\. (?!\w[\w-]*::)|^\s*\.\. (index|highlight|testsetup|testcleanup|sectionauthor|moduleauthor)::")


def clean_rst(text: str) -> str:
    """reST source -> readable plain text (keeps paragraphs and code examples)."""
    out: list[str] = []
    in_directive = dropping = False
    for line in text.splitlines():
        if dropping:
            if not line.strip() or line[:1].isspace():
                continue
            dropping = False
        if _DIRECTIVE.match(line):
            # drop the directive line and its options; the body of notes and code blocks stays
            in_directive, dropping = True, bool(_DROP_BODY.match(line))
            continue
        if in_directive:
            if re.match(r"^\s+:[\w-]+:", line):
                continue
            in_directive = False
        if _UNDERLINE.match(line):
            continue
        line = _ROLE.sub(lambda m: f"`{m.group(1).strip()}`", line)
        line = line.replace("``", "`").replace("|version|", "3.11")
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def iter_sources() -> list[Path]:
    files: list[Path] = []
    for section in SECTIONS:
        path = SOURCES / section
        files += [path] if path.is_file() else sorted(p for p in path.glob("*.rst.txt") if p.name not in SKIP)
    return files


def main() -> int:
    if not SOURCES.is_dir():
        print(f"{SOURCES} not found: apt-get install python3.11-doc", file=sys.stderr)
        return 1
    with open(OUT, "w", encoding="utf-8") as f:
        for path in iter_sources():
            doc_id = str(path.relative_to(SOURCES)).removesuffix(".rst.txt")
            f.write(json.dumps({"id": doc_id, "text": clean_rst(path.read_text(encoding="utf-8"))}) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
