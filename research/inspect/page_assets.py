"""The page's inline stylesheet and its one script (page.py puts both inside the page)."""

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:18px 24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:12px 0 4px}.meta,.note{color:#555}.note{font-size:12.5px;max-width:75em}
.mono,.w,.prompt,.lens td,.lens th{font-family:ui-monospace,Menlo,Consolas,monospace}
.prompt{font-size:15px;max-width:75em}
.tok{position:relative;display:inline-block;white-space:pre;border-radius:3px;padding:0 1px;
 margin:1px 1px 1px 0;line-height:1.5}
.tok .tip{display:none;position:absolute;left:0;top:1.9em;z-index:9;background:#fff;
 border:1px solid #999;padding:4px 8px;font-size:12px;line-height:1.4;white-space:nowrap;
 box-shadow:0 2px 8px rgba(0,0,0,.2)}
.tok:hover .tip{display:block}.tip p{margin:2px 0}
.key{padding:0 6px;border-radius:3px}
table.alt,table.attr{border-collapse:collapse;font-size:12.5px}
.alt td,.alt th,.attr td,.attr th{padding:1px 8px;text-align:left}.num{text-align:right}
.w{white-space:pre}.scroll{overflow:auto;max-width:100%}
table.lens{border-collapse:collapse;font-size:11px}
.lens td,.lens th{border:1px solid #e4e4e4;padding:1px 3px;white-space:pre;max-width:7em;
 overflow:hidden;text-overflow:ellipsis}
.lens th{background:#f6f6f6;font-weight:normal}.lens th.row{text-align:right;color:#555}
.lens td.hit{outline:2px solid #e80;outline-offset:-2px}
.bar{position:relative;width:140px;height:12px;background:#f3f3f3}
.pair{display:flex;flex-wrap:wrap;column-gap:36px}.pair>div{flex:1 1 520px;max-width:550px}
.bar div{position:absolute;top:0;height:12px}.bar .mid{left:50%;width:1px;background:#999}
#thumbs canvas{width:50px;height:50px;margin:2px 3px 2px 0;border:2px solid #ddd;cursor:pointer;
 image-rendering:pixelated}
#thumbs canvas.on{border-color:#e80}#map{border:1px solid #ccc;margin-top:6px}
svg.kl{background:#fafafa;border:1px solid #eee}
"""

# Draws the attention maps from the JSON in #attention-data (document.ATTENTION_ENCODING):
# thumbnails of every head of the chosen layer, one large map with token labels, values on hover.
SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('attention-data').textContent);
  var n = data.tokens.length, cache = {};
  var layerBox = document.getElementById('layer'), headBox = document.getElementById('head');
  var map = document.getElementById('map'), readout = document.getElementById('readout');
  var thumbs = document.getElementById('thumbs');
  var label = n <= 64 ? 120 : 0, cell = Math.max(3, Math.min(20, Math.floor(600 / n)));
  function weights(l, h) {
    var key = l + ',' + h;
    if (!cache[key]) {
      var s = atob(data.data[l][h]), a = new Uint8Array(s.length);
      for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
      cache[key] = a;
    }
    return cache[key];
  }
  function at(a, q, k) { return k > q ? 0 : a[q * (q + 1) / 2 + k] / 255; }
  function paint(canvas, a, size, offset) {
    var ctx = canvas.getContext('2d');
    for (var q = 0; q < n; q++) for (var k = 0; k < n; k++) {
      var w = Math.sqrt(at(a, q, k));  // sqrt: small weights stay visible beside a sink.
      ctx.fillStyle = k > q ? '#fafafa' : 'rgb(' + Math.round(255 - 225 * w) + ',' +
        Math.round(255 - 170 * w) + ',' + Math.round(255 - 60 * w) + ')';
      ctx.fillRect(offset + k * size, offset + q * size, size, size);
    }
  }
  function draw() {
    var l = +layerBox.value, h = +headBox.value;
    map.width = map.height = label + n * cell;
    var ctx = map.getContext('2d');
    ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, map.width, map.height);
    paint(map, weights(l, h), cell, label);
    if (label) {
      ctx.fillStyle = '#333'; ctx.font = Math.min(12, cell) + 'px monospace';
      ctx.textBaseline = 'middle';
      for (var t = 0; t < n; t++) {
        var text = data.tokens[t].slice(0, 14);
        ctx.textAlign = 'right'; ctx.fillText(text, label - 4, label + (t + 0.5) * cell);
        ctx.save(); ctx.translate(label + (t + 0.5) * cell, label - 4);
        ctx.rotate(-Math.PI / 2); ctx.textAlign = 'left'; ctx.fillText(text, 0, 0);
        ctx.restore();
      }
    }
    var boxes = thumbs.getElementsByTagName('canvas');
    for (var i = 0; i < boxes.length; i++) boxes[i].className = i === h ? 'on' : '';
  }
  function drawThumbs() {
    thumbs.textContent = '';
    var size = Math.max(1, Math.floor(72 / n)), l = +layerBox.value;
    for (var h = 0; h < data.heads; h++) {
      var c = document.createElement('canvas');
      c.width = c.height = size * n; c.title = 'head ' + (h + 1);
      paint(c, weights(l, h), size, 0);
      c.onclick = (function (head) { return function () { headBox.value = head; draw(); }; })(h);
      thumbs.appendChild(c);
    }
  }
  map.onmousemove = function (e) {
    var r = map.getBoundingClientRect();
    var k = Math.floor((e.clientX - r.left - label) / cell);
    var q = Math.floor((e.clientY - r.top - label) / cell);
    if (q < 0 || k < 0 || q >= n || k >= n) { readout.textContent = ''; return; }
    var w = at(weights(+layerBox.value, +headBox.value), q, k);
    readout.textContent = 'query #' + q + ' ' + data.tokens[q] + '  ->  key #' + k + ' ' +
      data.tokens[k] + ': ' + w.toFixed(3);
  };
  layerBox.onchange = function () { drawThumbs(); draw(); };
  headBox.onchange = draw;
  drawThumbs(); draw();
})();
"""
