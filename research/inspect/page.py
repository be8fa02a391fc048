"""The inspection document (document.py) as one self-contained HTML page.

Plain HTML and inline CSS, an inline SVG strip and a small inline script that draws the
attention maps on a canvas; nothing is fetched to view it (a Content-Security-Policy of
default-src 'none' makes the browser refuse any request). Token text is escaped everywhere:
`html.escape` in markup; JSON in the script tag with <, > and & written as \\u escapes, and
read back with `textContent`, never as markup.
"""

import html
import json
import math
import os

from research.inspect import page_assets

_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
_TOP_CHANGED = 12  # Positions listed under "most changed".


def write(document: dict, html_path: str) -> str:
    """Writes the page to html_path and the document next to it (same name, .json); returns
    the JSON's path."""
    json_path = os.path.splitext(html_path)[0] + ".json"
    directory = os.path.dirname(os.path.abspath(html_path))
    os.makedirs(directory, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(document, f, ensure_ascii=False, allow_nan=False)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(render(document))
    return json_path


def render(document: dict) -> str:
    """The page's HTML."""
    doc = document
    model = doc["model"]
    title = f"Cirrus inspect: {_name(model['source'])}"
    sections = [_header(doc), _tokens(doc)]
    if doc["compare"] is not None:
        sections.append(_compare(doc))
    sections.append(_lens(doc))
    # Side by side where the window is wide enough.
    sections.append(
        f"<div class='pair'><div>{_attention(doc)}</div><div>{_attribution(doc)}</div></div>"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        f"<title>{_e(title)}</title><style>{page_assets.STYLE}</style></head><body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(text: str, *, spaces: bool = False) -> str:
    """Control characters as visible marks (newline, tab, others as \\xNN); spaces as
    open boxes where `spaces` (a leading space tells tokens apart)."""
    marks = {"\n": "↵", "\t": "⇥", "\r": "␍"}
    out = []
    for char in text:
        if char in marks:
            out.append(marks[char])
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        elif spaces and char == " ":
            out.append("␣")
        else:
            out.append(char)
    return "".join(out) or "∅"


def _word(doc, token_id: int) -> str:
    """One token's escaped, visible text."""
    return _e(_visible(doc["vocab"][str(token_id)], spaces=True))


def _logprob_color(logprob) -> str:
    """Red (log p <= -8) through yellow to green (log p = 0)."""
    hue = 120 * min(max(1 + logprob / 8, 0.0), 1.0)
    return f"hsl({hue:.0f},75%,80%)"


def _prob_color(prob: float) -> str:
    return f"rgba(30,100,220,{0.08 + 0.82 * prob:.2f})"


def _alternatives(doc, ids, logprobs) -> str:
    rows = "".join(
        f"<tr><td class='w'>{_word(doc, i)}</td><td>{math.exp(lp):.3f}</td><td>{lp:.2f}</td></tr>"
        for i, lp in zip(ids, logprobs, strict=True)
    )
    return f"<table class='alt'><tr><th>token</th><th>p</th><th>log p</th></tr>{rows}</table>"


def _name(source: str) -> str:
    """A source's last path component (a workdir, HF directory or .gguf file)."""
    return os.path.basename(source.rstrip("/")) or source


def _header(doc) -> str:
    model, n = doc["model"], len(doc["token_ids"])
    weights = "float" if model["quant"] == "none" else model["quant"]
    shape = (
        f"{model['source']}: {model['layers']} layers, {model['heads']} heads "
        f"({model['kv_heads']} kv), d_model {model['d_model']}, vocab {model['vocab_size']}, "
        f"{weights} weights"
    )
    compared = ""
    if doc["compare"] is not None:
        other = doc["compare"]["other"]
        compared = (
            f"<p>Compared with <b>{_e(_name(other['source']))}</b> ({_e(other['source'])})</p>"
        )
    return (
        f"<h1>{_e(_name(model['source']))}</h1>"
        f"<p class='meta'>{_e(shape)}; prompt of {n} tokens.</p>"
        f"{compared}"
    )


def _tokens(doc) -> str:
    """The prompt, each token coloured by the log-probability the model gave it; hovering
    shows the model's top alternatives at that place."""
    ids, nxt = doc["token_ids"], doc["next"]
    spans = []
    for t, token_id in enumerate(ids):
        text = doc["vocab"][str(token_id)]
        logprob = nxt["logprob"][t]
        if logprob is None:
            color, tip = "#eee", "<p>first token: nothing predicts it</p>"
        else:
            color = _logprob_color(logprob)
            tip = (
                f"<p>log p = {logprob:.2f} (p = {math.exp(logprob):.3f}); id {token_id}</p>"
                + _alternatives(doc, nxt["top_ids"][t - 1], nxt["top_logprobs"][t - 1])
            )
        spans.append(
            f"<span class='tok' style='background:{color}'>{_e(_visible(text))}"
            f"<span class='tip'><b>#{t}</b> {tip}</span></span>" + ("<br>" if "\n" in text else "")
        )
    after = _alternatives(doc, nxt["top_ids"][-1], nxt["top_logprobs"][-1])
    return (
        "<h2>Tokens</h2><p class='note'>Each token coloured by the log-probability the model "
        "gave it: <span class='key' style='background:hsl(0,75%,80%)'>log p &le; -8</span> "
        "<span class='key' style='background:hsl(60,75%,80%)'>-4</span> "
        "<span class='key' style='background:hsl(120,75%,80%)'>0</span>. Hover a token for "
        "the model's top alternatives there.</p>"
        f"<div class='prompt'>{''.join(spans)}</div>"
        f"<h3>Next token after the prompt</h3>{after}"
    )


def _lens(doc) -> str:
    """Logit lens: layers x positions, the top token of each cell, shaded by its probability."""
    lens, ids = doc["lens"], doc["token_ids"]
    header = "".join(f"<th title='{_e(f'#{t}')}'>{_word(doc, i)}</th>" for t, i in enumerate(ids))
    rows = []
    for row, name in enumerate(lens["rows"]):
        cells = []
        for t in range(len(ids)):
            top_ids, top_lps = lens["top_ids"][row][t], lens["top_logprobs"][row][t]
            prob = math.exp(top_lps[0])
            hits = t + 1 < len(ids) and top_ids[0] == ids[t + 1]
            tip = f"{name}, after #{t}: " + ", ".join(
                f"{_visible(doc['vocab'][str(i)], spaces=True)} {math.exp(lp):.3f}"
                for i, lp in zip(top_ids, top_lps, strict=True)
            )
            if t + 1 < len(ids):
                tip += f"; actual next: log p = {lens['next_logprob'][row][t]:.2f}"
            style = f"background:{_prob_color(prob)}" + (";color:#fff" if prob > 0.6 else "")
            cells.append(
                f"<td class='{'hit' if hits else ''}' style='{style}' title='{_e(tip)}'>"
                f"{_word(doc, top_ids[0])}</td>"
            )
        rows.append(f"<tr><th class='row'>{_e(name)}</th>{''.join(cells)}</tr>")
    return (
        "<h2>Logit lens</h2><p class='note'>Every layer's residual stream through the final "
        "norm and the LM head: the top next token at each position (columns: the token just "
        "read), shaded by its probability; outlined where it is the actual next token. The "
        "last row is the model's output. Hover a cell for the top alternatives.</p>"
        f"<div class='scroll'><table class='lens'><tr><th></th>{header}</tr>"
        f"{''.join(rows)}</table></div>"
    )


def _script_json(value) -> str:
    """JSON for a <script type='application/json'>: nothing in it can close the tag."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _attention(doc) -> str:
    attention = doc["attention"]
    if attention is None:
        return (
            "<h2>Attention</h2><p class='note'>Not captured: the prompt is longer than the "
            "attention limit or attention was left out.</p>"
        )
    data = {
        "tokens": [_visible(doc["vocab"][str(i)], spaces=True) for i in doc["token_ids"]],
        "layers": attention["layers"],
        "heads": attention["heads"],
        "data": attention["data"],
    }
    layers = "".join(f"<option value='{i}'>{i + 1}</option>" for i in range(data["layers"]))
    heads = "".join(f"<option value='{i}'>{i + 1}</option>" for i in range(data["heads"]))
    return (
        "<h2>Attention</h2><p class='note'>Softmax weights of one layer and head (query "
        "heads; grouped kv heads are shared): row = query position, column = key position, "
        "darker = more weight (shaded by its square root). Click a thumbnail to pick a head; "
        "hover the map for values.</p>"
        f"<p>layer <select id='layer'>{layers}</select> head <select id='head'>{heads}"
        "</select> <span id='readout' class='mono'></span></p>"
        "<div id='thumbs'></div><canvas id='map' width='10' height='10'></canvas>"
        f"<script type='application/json' id='attention-data'>{_script_json(data)}</script>"
        f"<script>{page_assets.SCRIPT}</script>"
    )


def _attribution(doc) -> str:
    found = doc["attribution"]
    ids, values, norms = doc["token_ids"], found["grad_x_input"], found["norm"]
    scale = max(max(abs(v) for v in values), 1e-12)
    norm_scale = max(max(norms), 1e-12)
    position = found["position"]
    where = "the token after the prompt" if position == len(ids) else f"prompt token #{position}"
    rows = []
    for t, token_id in enumerate(ids):
        value, norm = values[t], norms[t]
        width = 50 * abs(value) / scale
        side = "left:50%" if value >= 0 else "right:50%"
        color = "#3a3" if value >= 0 else "#c44"
        rows.append(
            f"<tr><td class='num'>{t}</td><td class='w'>{_word(doc, token_id)}</td>"
            f"<td><div class='bar'><div class='mid'></div><div style='{side};width:{width:.1f}%;"
            f"background:{color}'></div></div></td><td class='num'>{value:+.4f}</td>"
            f"<td><div class='bar'><div style='left:0;width:{100 * norm / norm_scale:.1f}%;"
            f"background:#48c'></div></div></td><td class='num'>{norm:.4f}</td></tr>"
        )
    return (
        f"<h2>Attribution</h2><p>Target: <b class='w'>{_word(doc, found['token'])}</b> "
        f"(id {found['token']}) as {_e(where)}, log p = {found['logprob']:.3f}.</p>"
        "<p class='note'>Gradient x input: the gradient of the target's log-probability with "
        "respect to each prompt token's embedding, times the embedding, summed over the "
        "embedding dimension (signed: green raises the target), and its L2 norm over the "
        "embedding dimension. Tokens from the target on get zero.</p>"
        "<table class='attr'><tr><th>#</th><th>token</th><th>grad x input</th><th></th>"
        f"<th>L2 norm</th><th></th></tr>{''.join(rows)}</table>"
    )


def _compare(doc) -> str:
    """KL(base || other) per position as an SVG strip, and the most changed positions."""
    cmp, ids = doc["compare"], doc["token_ids"]
    kl = cmp["kl"]
    top = max(max(kl), 1e-12)
    width, height, step = 14 * len(ids), 90, 14
    bars = []
    for t, value in enumerate(kl):
        h = max(1.0, (height - 10) * value / top)
        tip = (
            f"#{t} {_visible(doc['vocab'][str(ids[t])], spaces=True)}: KL {value:.4f}; top-1 "
            f"{_visible(doc['vocab'][str(cmp['base_top1'][t])], spaces=True)} -> "
            f"{_visible(doc['vocab'][str(cmp['other_top1'][t])], spaces=True)}"
        )
        fill = "#d33" if cmp["changed"][t] else "#e89"
        bars.append(
            f"<rect x='{t * step + 1}' y='{height - h:.1f}' width='{step - 2}' height='{h:.1f}' "
            f"fill='{fill}'><title>{_e(tip)}</title></rect>"
        )
    strip = (
        f"<svg class='kl' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
        f"role='img'>{''.join(bars)}</svg>"
    )
    rows = []
    for t in cmp["order"][:_TOP_CHANGED]:
        context = "".join(_visible(doc["vocab"][str(i)]) for i in ids[max(0, t - 5) : t + 1])
        mark = "changed" if cmp["changed"][t] else "same"
        rows.append(
            f"<tr><td class='num'>{t}</td><td class='w'>…{_e(context)}</td>"
            f"<td class='num'>{kl[t]:.4f}</td><td class='w'>{_word(doc, cmp['base_top1'][t])}"
            f"</td><td class='w'>{_word(doc, cmp['other_top1'][t])}</td><td>{mark}</td></tr>"
        )
    mean = sum(kl) / len(kl)
    changes = sum(cmp["changed"])
    return (
        f"<h2>Compared with {_e(_name(cmp['other']['source']))}</h2>"
        "<p class='note'>KL(base || other) of the next-token distributions after each prompt "
        f"token (mean {mean:.4f} nats; top-1 "
        f"changed at {changes} of {len(ids)} positions, dark bars). Hover a bar for details.</p>"
        f"<div class='scroll'>{strip}</div><h3>Most changed positions</h3>"
        "<table class='attr'><tr><th>#</th><th>context</th><th>KL</th><th>base top-1</th>"
        f"<th>other top-1</th><th></th></tr>{''.join(rows)}</table>"
    )
