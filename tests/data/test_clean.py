"""Cleaning: each step on handcrafted documents, and the counts of the report."""

from research.data import clean
from research.data.clean import CleanReport, clean_documents


def test_unicode_normalization_nfkc_folds_compatibility_forms():
    text = "ﬁne ＡＢＣ café"  # ligature, full-width letters, decomposed é
    assert clean.normalize_unicode(text, "NFKC") == "fine ABC café"
    assert clean.normalize_unicode(text, "NFC") == "ﬁne ＡＢＣ café"
    assert clean.normalize_unicode(text, "") == text


def test_control_chars_are_stripped_but_newline_and_tab_kept():
    text = "a\x00b\x07c\td\r\ne\rf\x1b[0m\ufeffg\u200bh\x7f"
    assert clean.strip_control_chars(text) == "abc\td\ne\nf[0mgh"


def test_markup_stripping_on_shakespeare_markdown():
    text = (
        "# Twelfth Night\n\n## ACT I\n\n### SCENE I. An apartment in the DUKE'S palace.\n\n"
        "_Enter DUKE ORSINO, CURIO, and other Lords; Musicians attending_\n\n"
        "**DUKE ORSINO**  \nIf music be the food of love, play on;  \n"
        "__\\[Awaking]_  \n\\--odours savours sweet"
    )
    out = clean.normalize_whitespace(clean.strip_markup(text))
    assert out == (
        "Twelfth Night\n\nACT I\n\nSCENE I. An apartment in the DUKE'S palace.\n\n"
        "Enter DUKE ORSINO, CURIO, and other Lords; Musicians attending\n\n"
        "DUKE ORSINO\nIf music be the food of love, play on;\n[Awaking]\n--odours savours sweet"
    )


def test_markup_stripping_html_links_and_code():
    text = (
        "<p>Hello <b>world</b> &amp; <i>friends</i></p><!-- hidden -->"
        "See [the docs](http://x.y/z) and ![a cat](cat.png).\n"
        "```python\nx = a_b_c * 2*3*4\n```\n> quoted `code` ~~old~~\n---\n"
    )
    out = clean.strip_markup(text)
    assert out == (
        "Hello world & friends\nSee the docs and a cat.\n\nx = a_b_c * 2*3*4\n\nquoted code old\n\n"
    )


def test_whitespace_normalisation():
    text = "  Title\u00a0here   \n\n\n\nline  with   runs\t \n\tindented\n\n"
    assert clean.normalize_whitespace(text) == "Title here\n\nline with runs\n\tindented"


def test_clean_documents_counts_every_step():
    long_text = "To be, or not to be, that is the question: whether 'tis nobler."
    docs = [
        "**HAMLET**  \n" + long_text,  # markup: 4 stars removed, 2 trailing spaces
        "\x00\x01" + long_text + " again",  # 2 control characters
        "   \n\t\n",  # empty after cleaning
        "<b></b>",  # empty after markup stripping
        "short one",  # too short
        "HAMLET\n" + long_text,  # duplicate of the first after cleaning
        "ﬁ" + long_text,  # changed by NFKC
    ]
    kept, report = clean_documents(docs, min_chars=20)
    assert kept == ["HAMLET\n" + long_text, long_text + " again", "fi" + long_text]
    assert report == CleanReport(
        documents_in=7,
        removed_empty=2,
        removed_too_short=1,
        removed_duplicates=1,
        documents_out=3,
        documents_changed_by_normalization=1,
        control_chars_removed=2,
        markup_chars_removed=4 + 7,
        whitespace_chars_removed=2 + 6,
        characters_in=sum(map(len, docs)),
        characters_out=sum(map(len, kept)),
    )
    assert report.as_dict()["removed_duplicates"] == 1
    assert "3 out" in str(report) and "1 duplicates" in str(report)


def test_clean_documents_min_chars_zero_keeps_short_documents():
    kept, report = clean_documents(["a", "b", "a"], min_chars=0)
    assert kept == ["a", "b"] and report.removed_duplicates == 1 and report.removed_too_short == 0
