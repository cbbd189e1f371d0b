"""Wiki-40B's structure markers: to plain text for training, and back for writing data in its schema.

A Wiki-40B `text` value looks like
    \\n_START_ARTICLE_\\nTitle\\n_START_PARAGRAPH_\\nLead para_NEWLINE_second para\\n_START_SECTION_\\nHistory\\n...
One _START_PARAGRAPH_ block holds all paragraphs of one section, joined by _NEWLINE_.
"""

from __future__ import annotations

from collections.abc import Sequence

ARTICLE = "_START_ARTICLE_"
SECTION = "_START_SECTION_"
PARAGRAPH = "_START_PARAGRAPH_"
NEWLINE = "_NEWLINE_"
_MARKERS = (ARTICLE, SECTION, PARAGRAPH)

Sections = Sequence[tuple[str, Sequence[str]]]


def parse_wiki40b(raw: str) -> tuple[str, list[str], list[tuple[str, list[str]]]]:
    """Marker text -> (title, lead paragraphs, [(section heading, paragraphs), ...])."""
    title_lines: list[str] = []
    lead: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    kind = None
    for line in raw.split("\n"):
        line = line.strip()
        if line in _MARKERS:
            kind = line
            if kind == SECTION:
                sections.append(("", []))
            continue
        if not line:
            continue
        if kind == PARAGRAPH:
            target = sections[-1][1] if sections else lead
            target.extend(p.strip() for p in line.split(NEWLINE) if p.strip())
        elif kind == SECTION:
            heading = sections[-1][0]
            sections[-1] = ((heading + " " + line).strip(), sections[-1][1])
        else:  # the title (or text before any marker)
            title_lines.append(line)
    return " ".join(title_lines), lead, sections


def wiki40b_to_text(raw: str) -> str:
    """Marker text -> plain text: the title line, then blocks separated by a blank line; a section
    heading sits on its own line right above its paragraphs; _NEWLINE_ (between paragraphs) -> "\\n".
    Text without markers is returned with only _NEWLINE_ replaced."""
    if not any(m in raw for m in _MARKERS):
        return raw.replace(NEWLINE, "\n")
    title, lead, sections = parse_wiki40b(raw)
    blocks = [title] if title else []
    if lead:
        blocks.append("\n".join(lead))
    for heading, paragraphs in sections:
        blocks.append("\n".join(([heading] if heading else []) + list(paragraphs)))
    return "\n\n".join(b for b in blocks if b)


def to_wiki40b_markers(title: str, paragraphs: Sequence[str], sections: Sections | None = None) -> str:
    """(title, lead paragraphs, [(heading, paragraphs)]) -> a Wiki-40B `text` value (inverse of parse_wiki40b
    for non-empty, single-line paragraphs; newlines inside a paragraph become _NEWLINE_ too)."""

    def one_line(s: str) -> str:
        return " ".join(s.split())

    def paragraph_block(paras: Sequence[str]) -> list[str]:
        paras = [p.strip().replace("\n", NEWLINE) for p in paras if p.strip()]
        return [PARAGRAPH, NEWLINE.join(paras)] if paras else []

    # Wiki-40B values start with a newline before _START_ARTICLE_; mirror that.
    parts = ["", ARTICLE, one_line(title)] + paragraph_block(paragraphs)
    for heading, paras in sections or []:
        parts += [SECTION, one_line(heading)] + paragraph_block(paras)
    return "\n".join(parts)
