"""The JSON document and the HTML page: token text escaped everywhere, attention encoding
round trip, byte tokens shown as escapes."""

import html.parser
import json

import numpy as np

from research.data import default_corpus_documents, train_tokenizer
from research.inspect import Comparison, Inspection, document, render, token_text
from research.inspect.document import decode_attention, encode_attention

NASTY = [
    "</script><script>alert(1)</script>",
    "\"'&<>",
    "\n",
    "\x00\x1b",
    "<!--",
    " café ☃",
]


_VOID = {"br", "meta", "img", "input", "hr"}


class _Page(html.parser.HTMLParser):
    """Collects the prompt tokens' text (span.tok without tooltips) and the script tags."""

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append([dict(attrs).get("id"), ""])
        if tag not in _VOID:
            self.stack.append(dict(attrs).get("class"))

    def handle_endtag(self, tag):
        if tag not in _VOID:
            assert self.stack, f"</{tag}> closes nothing"
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "tok":
            self.text.append(data)
        if self.scripts and self.lasttag == "script":
            self.scripts[-1][1] += data


def parse(page_html: str) -> _Page:
    parser = _Page()
    parser.feed(page_html)
    parser.close()
    assert parser.stack == [], "unbalanced tags"
    return parser


def prompt_text(page_html: str) -> str:
    """The page's prompt as its token spans show it (control characters as marks)."""
    return "".join(parse(page_html).text)


def _inspection(t=6, layers=2, heads=2, k=2, vocab=10):
    rng = np.random.default_rng(0)
    weights = rng.random((layers, heads, t, t)) * np.tril(np.ones((t, t)))
    logprobs = np.log(rng.dirichlet(np.ones(vocab), size=t)).astype(np.float32)
    return Inspection(
        token_ids=np.arange(t, dtype=np.int32),
        logprobs=logprobs,
        next_logprob=-rng.random(t - 1).astype(np.float32),
        top_ids=rng.integers(0, vocab, (t, k)),
        top_logprobs=-rng.random((t, k)),
        lens_top_ids=rng.integers(0, vocab, (layers + 1, t, k)),
        lens_top_logprobs=-rng.random((layers + 1, t, k)),
        lens_next_logprob=-rng.random((layers + 1, t - 1)),
        attention=weights / weights.sum(-1, keepdims=True),
        target_position=t,
        target_token=3,
        target_logprob=-1.5,
        attribution=rng.normal(size=t),
        attribution_norm=rng.random(t),
    )


def test_token_text_is_escaped_everywhere():
    found = _inspection()
    kl = np.linspace(0, 1, 6)
    comparison = Comparison(kl, found.top_ids[:, 0], found.top_ids[:, 1], kl > 0.5, kl.argsort())
    model = {"source": "</h1><i>x", "layers": 2, "heads": 2, "kv_heads": 1, "d_model": 4}
    model |= {"vocab_size": 10, "quant": "none"}
    doc = document(
        found, tokenizer=None, prompt="p", model=model, comparison=comparison, other=model
    )
    doc["vocab"].update({str(i): text for i, text in enumerate(NASTY)})
    page = render(doc)
    parsed = parse(page)
    shown = ["</script><script>alert(1)</script>", "\"'&<>", "↵", "\\x00\\x1b", "<!--"]
    assert "".join(parsed.text) == "".join(shown) + " café ☃"
    assert [name for name, _ in parsed.scripts] == ["attention-data", None]
    data = json.loads(parsed.scripts[0][1])
    assert data["tokens"][:2] == NASTY[:2] and data["tokens"][5] == "␣café␣☃"
    assert "alert(1)</script>" not in page and "<i>x" not in page
    assert json.loads(json.dumps(doc)) == doc  # Plain JSON types only.


def test_attention_encoding_round_trips_within_a_step():
    weights = _inspection().attention[1, 0]
    back = decode_attention(encode_attention(weights), len(weights))
    np.testing.assert_allclose(back, weights, atol=0.5 / 255 + 1e-7)
    assert np.all(np.triu(back, 1) == 0)


def test_token_text_shows_pieces_of_a_character_as_bytes():
    tokenizer = train_tokenizer(default_corpus_documents()[:20], 300)
    ids = tokenizer.encode("☃ and")
    texts = [token_text(tokenizer, i) for i in ids]
    assert texts[0].startswith("\\xe2"), texts  # A byte-level piece of the snowman.
    assert "".join(texts).endswith(" and")
