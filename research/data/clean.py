"""Document cleaning: Unicode normalization, control and markup stripping, whitespace,
PII and secret scrubbing (scrub.py), length filter and exact deduplication, with a report of
what each step removed or replaced.

Each step is a plain `str -> str` function; `clean_documents` runs them in order and counts.
"""

import dataclasses
import hashlib
import html
import re
import unicodedata

from research.data import scrub

NORMALIZATION_FORMS = ("NFC", "NFKC", "")

# Control characters (Unicode category Cc) except \t and \n, lone surrogates, and the
# invisible format characters common in scraped text (BOM, zero-width space).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\ufeff\u200b]")
# Unicode space separators (category Zs) other than the ASCII space.
_UNICODE_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")

_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_BREAK = re.compile(r"<(?:br|/p|/div|/li|/h[1-6])\s*/?>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_HTML_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_CODE_FENCE = re.compile(r"^[ \t]*(?:```|~~~).*$", re.MULTILINE)
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$", re.MULTILINE)
_BLOCKQUOTE = re.compile(r"^[ \t]{0,3}>[ \t]?", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\n]*\)")
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
# Emphasis spans lines but not paragraphs; opener and closer may differ in length
# (`__[Awaking]_` occurs in the corpus). `*` and `_` inside words (2*3*4, snake_case) stay.
_SPAN = r"((?:[^\n]|\n(?![ \t]*\n))+?)"
_STAR_EMPHASIS = re.compile(
    r"(?<![\w\\*])\*{1,3}(?=[^\s*])" + _SPAN + r"(?<=[^\s\\*])\*{1,3}(?![\w*])"
)
_UNDERSCORE_EMPHASIS = re.compile(
    r"(?<![\w\\])_{1,3}(?=[^\s_])" + _SPAN + r"(?<=[^\s\\_])_{1,3}(?!\w)"
)
_STRIKE = re.compile(r"~~(?=\S)" + _SPAN + r"(?<=\S)~~")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>])")

_SPACE_RUN = re.compile(r"(?<=\S) {2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_unicode(text: str, form: str = "NFKC") -> str:
    """Unicode normalization; NFKC also folds compatibility forms (ﬁ -> fi, full-width -> ASCII)."""
    return unicodedata.normalize(form, text) if form else text


def strip_control_chars(text: str) -> str:
    """Line endings become \\n; control characters other than \\n and \\t are dropped."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def strip_markup(text: str) -> str:
    """Removes HTML tags/comments/entities and Markdown syntax, keeping the visible text.

    `**DUKE ORSINO**` -> `DUKE ORSINO`, `_Enter VIOLA_` -> `Enter VIOLA`, `### SCENE I.` ->
    `SCENE I.`, `[text](url)` -> `text`, `\\--` -> `--`.
    """
    text = _HTML_COMMENT.sub("", text)
    text = _HTML_BREAK.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    text = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    text = _CODE_FENCE.sub("", text)
    text = _RULE.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _BLOCKQUOTE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _INLINE_CODE.sub(r"\1", text)
    for _ in range(3):  # Nested emphasis (`**_x_**`) needs more than one pass.
        stripped = _STRIKE.sub(r"\1", text)
        stripped = _STAR_EMPHASIS.sub(r"\1", stripped)
        stripped = _UNDERSCORE_EMPHASIS.sub(r"\1", stripped)
        if stripped == text:
            break
        text = stripped
    return _ESCAPE.sub(r"\1", text)


def normalize_whitespace(text: str) -> str:
    """Unicode spaces -> ' ', no trailing spaces, inner space runs -> one, <= 1 blank line."""
    text = _UNICODE_SPACE.sub(" ", text)
    lines = [_SPACE_RUN.sub(" ", line.rstrip()) for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def clean_text(text: str, normalization: str = "NFKC") -> str:
    """All text steps of `clean_documents` on one document."""
    text = normalize_unicode(text, normalization)
    return normalize_whitespace(strip_markup(strip_control_chars(text)))


@dataclasses.dataclass(frozen=True)
class CleanReport:
    """What cleaning did: document counts per filter and characters removed per step."""

    documents_in: int = 0
    removed_empty: int = 0
    removed_too_short: int = 0
    removed_duplicates: int = 0
    documents_out: int = 0
    documents_changed_by_normalization: int = 0
    control_chars_removed: int = 0
    markup_chars_removed: int = 0
    whitespace_chars_removed: int = 0
    characters_in: int = 0
    characters_out: int = 0
    # Placeholders put into the kept documents, per kind (email, phone, ip, card, secret)
    # and per extra pattern name (data.scrub_patterns); only kinds that occurred.
    scrubbed: dict = dataclasses.field(default_factory=dict)
    documents_scrubbed: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"cleaning: {self.documents_in} documents in, {self.documents_out} out "
            f"(removed {self.removed_empty} empty, {self.removed_too_short} too short, "
            f"{self.removed_duplicates} duplicates); "
            f"{self.documents_changed_by_normalization} changed by Unicode normalization; "
            f"characters removed: {self.control_chars_removed} control, "
            f"{self.markup_chars_removed} markup, {self.whitespace_chars_removed} whitespace; "
            f"{self.characters_in} -> {self.characters_out} characters; "
            f"scrubbed {self.documents_scrubbed} documents ({scrub.describe(self.scrubbed)})"
        )


def clean_documents(
    documents,
    min_chars: int = 64,
    *,
    normalization: str = "NFKC",
    scrubber: scrub.Scrubber | None = None,
) -> tuple[list[str], CleanReport]:
    """Cleans, scrubs, filters and deduplicates documents, keeping the first of each duplicate.

    Args:
      documents: raw document strings.
      min_chars: cleaned documents with fewer characters are dropped.
      normalization: "NFKC", "NFC" or "" (none).
      scrubber: replaces PII and secrets by placeholders after the text steps (before the
        length filter and deduplication); None = no scrubbing (DataConfig.scrubber() gives
        data preparation's, on by default).
    Returns:
      (cleaned documents in input order, CleanReport).
    """
    if normalization not in NORMALIZATION_FORMS:
        raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATION_FORMS}.")
    counts = dict.fromkeys(
        (
            field.name
            for field in dataclasses.fields(CleanReport)
            if field.name not in ("documents_in", "scrubbed")
        ),
        0,
    )
    scrubbed: dict[str, int] = {}
    seen = set()
    kept = []
    documents = list(documents)
    for document in documents:
        counts["characters_in"] += len(document)
        text = normalize_unicode(document, normalization)
        counts["documents_changed_by_normalization"] += text != document
        for step, counter in (
            (strip_control_chars, "control_chars_removed"),
            (strip_markup, "markup_chars_removed"),
            (normalize_whitespace, "whitespace_chars_removed"),
        ):
            stepped = step(text)
            counts[counter] += len(text) - len(stepped)
            text = stepped
        found = {}
        if scrubber is not None and text:
            text, found = scrubber.scrub(text)
        if not text:
            counts["removed_empty"] += 1
            continue
        if len(text) < min_chars:
            counts["removed_too_short"] += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen:
            counts["removed_duplicates"] += 1
            continue
        seen.add(digest)
        kept.append(text)
        counts["characters_out"] += len(text)
        counts["documents_scrubbed"] += bool(found)
        scrub.add_counts(scrubbed, found)
    counts["documents_out"] = len(kept)
    return kept, CleanReport(documents_in=len(documents), scrubbed=scrubbed, **counts)
