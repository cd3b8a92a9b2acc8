/* lminfluence report: unpacks the data embedded in the page and draws each card when it comes into view.
   The data's layout is described in payload.py; number formats follow numbers.py. Nothing is fetched. */
(() => {
  "use strict";
  let D = null; // the payload
  const textOf = new Map(); // seq_index -> its text
  const docOf = new Map(); // seq_index -> document number
  const cards = new Map(); // card number -> {card, heat, info, cap, side, tokens, values, cur, pin}
  let mode = "query"; // colour scale: card | query | all
  const SCOPE = { card: "this card", query: "this query", all: "all queries" };

  // ---- numbers (numbers.py: one format per column, ASCII signs) ----
  function decimalsFor(peak) {
    if (peak === 0) return 0;
    if (!(peak >= 1e-3 && peak < 1e7)) return null;
    return Math.max(0, 2 - Math.floor(Math.log10(peak)));
  }
  function fmt(x, signed, peak) {
    if (x === null || !Number.isFinite(x)) return "n/a";
    const d = decimalsFor(Math.abs(peak === undefined ? x : peak));
    let s = d === null ? x.toExponential(2).replace(/e([+-])(\d)$/, "e$10$2") : x.toFixed(d);
    if (signed && !s.startsWith("-")) s = "+" + s;
    return s;
  }
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

  // ---- data ----
  const B85 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;.=>?@^_`{|}~"; // "<" written as "."
  function base85(text) {
    const value = new Uint8Array(128);
    for (let i = 0; i < 85; i++) value[B85.charCodeAt(i)] = i;
    const n = text.length, full = Math.floor(n / 5), rest = n % 5;
    const out = new Uint8Array(full * 4 + (rest ? rest - 1 : 0));
    for (let g = 0; g <= full; g++) {
      const m = g < full ? 5 : rest;
      if (m === 0) break;
      let acc = 0;
      for (let j = 0; j < 5; j++) acc = acc * 85 + (j < m ? value[text.charCodeAt(g * 5 + j)] : 84); // pad with the last digit
      for (let j = 0; j < m - 1; j++) out[g * 4 + j] = (acc >>> (24 - 8 * j)) & 255;
    }
    return out;
  }
  async function unpack() {
    const bytes = base85(document.getElementById("data").textContent.trim());
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }
  function lengths(code) { // payload.lengths_text: one character per token, "~n." for long ones
    const out = [];
    for (let i = 0; i < code.length; i++) {
      if (code[i] !== "~") out.push(code.charCodeAt(i) - 48);
      else {
        const end = code.indexOf(".", i);
        out.push(+code.slice(i + 1, end));
        i = end;
      }
    }
    return out;
  }
  function tokensOf(k) {
    const c = D.cards[k], text = textOf.get(c[0]), out = [];
    let at = 0;
    for (const n of lengths(D.seqs[c[0]][1])) {
      out.push(text.slice(at, at + n));
      at += n;
    }
    return out;
  }
  function valuesOf(k) {
    const c = D.cards[k], step = c[2] / D.quant;
    return c[3].map((v) => (v === null ? NaN : v * step));
  }
  function peakOf(k) {
    const c = D.cards[k];
    return mode === "card" ? c[2] : mode === "query" ? D.queries[c[1]][0] : D.peak;
  }
  function level(t) {
    if (!Number.isFinite(t)) return "";
    const k = Math.floor(Math.min(Math.abs(t), 1) * D.levels + 0.5);
    return k === 0 ? "" : (t > 0 ? "p" : "n") + k;
  }

  // ---- a card ----
  function render(card) {
    const k = +card.dataset.k;
    if (cards.has(k) || D === null) return;
    const tokens = tokensOf(k);
    const heat = document.createElement("div");
    heat.className = "heat";
    heat.tabIndex = 0;
    heat.setAttribute("role", "group");
    heat.setAttribute("aria-label", "text of the sequence coloured by token; arrow keys move between tokens, Enter pins one");
    const frag = document.createDocumentFragment();
    tokens.forEach((t, i) => {
      const span = document.createElement("span");
      span.dataset.i = i;
      t.split("\n").forEach((part, j) => {
        if (j > 0) span.append(Object.assign(document.createElement("i"), { className: "nl" }), "\n");
        if (part) span.append(part);
      });
      frag.append(span);
    });
    heat.append(frag);
    const main = Object.assign(document.createElement("div"), { className: "card-main" });
    const info = Object.assign(document.createElement("p"), { className: "tokinfo" });
    info.setAttribute("aria-live", "polite");
    const cap = Object.assign(document.createElement("p"), { className: "cap" });
    const side = Object.assign(document.createElement("figure"), { className: "side" });
    main.append(heat, info, cap);
    card.querySelector(":scope > div").replaceChildren(main, side);
    cards.set(k, { card, heat, info, cap, side, tokens, values: valuesOf(k), cur: null, pin: null });
    paint(k);
    show(k, null);
  }
  function paintTokens(k) {
    const st = cards.get(k), peak = peakOf(k), kids = st.heat.children;
    for (let i = 0; i < kids.length; i++) {
      let c = (st.tokens[i] === "" ? "e " : "") + (peak > 0 ? level(st.values[i] / peak) : "");
      if (i === st.cur) c += " cur";
      if (i === st.pin) c += " pin";
      kids[i].className = c.trim();
    }
  }
  function paint(k) {
    const st = cards.get(k);
    paintTokens(k);
    st.cap.textContent = `${st.tokens.length} tokens · colour scale ±${fmt(peakOf(k), false)} (the largest |token score| of ${SCOPE[mode]})`;
    st.side.innerHTML = blocksSvg(k) + "<figcaption>score per transformer block</figcaption>";
  }
  function quote(t) {
    return t === "" ? "(no text)" : "“" + t.replace(/\n/g, "↵").replace(/\t/g, "⇥") + "”";
  }
  function describe(k, i) {
    const st = cards.get(k), n = st.tokens.length, peak = D.cards[k][2], v = st.values[i];
    const val = fmt(v, true, peak);
    const own = st.tokens[i] === "" ? " · no text of its own (a special token, or bytes of a character split over tokens)" : "";
    const where = ` · token ${i + 1} of ${n}`;
    if (i === n - 1) return `${quote(st.tokens[i])} is the last token: it predicts nothing (${val})${where}${own}`;
    return `${quote(st.tokens[i])} → predicts next ${quote(st.tokens[i + 1])}: ${val}${where}${own}`;
  }
  function show(k, hovered) { // the hovered token, else the keyboard cursor, else the pinned one
    const st = cards.get(k);
    const i = hovered !== null ? hovered : st.cur !== null ? st.cur : st.pin;
    if (i === null) st.info.textContent = "Click or tap a token (or focus the text and use ← →) for its value.";
    else st.info.textContent = (i === st.pin ? "pinned: " : "") + describe(k, i);
  }
  function blocksSvg(k) { // bars on one axis per scale: a weaker card draws shorter, an absent sign takes no room
    const c = D.cards[k], b = c[4], n = b.length;
    if (!n) return '<p class="note">No per-block scores.</p>';
    const W = 250, L = 44, R = 6, T = 8, B = 32, FULL = 72;
    const own = Math.max(...b.map(Math.abs));
    const peak = (mode === "card" ? own : mode === "query" ? D.queries[c[1]][1] : D.blockPeak) || 1;
    const hi = Math.max(0, ...b), lo = Math.min(0, ...b);
    const plot = Math.max((FULL * (hi - lo)) / peak, 12), H = T + plot + B;
    const y = (v) => T + ((hi - v) / (hi - lo || 1)) * plot;
    const step = (W - L - R) / n, every = Math.max(1, Math.ceil(n / 12)); // at most 12 labels: 24–48 blocks stay legible
    const label = b.map((v, i) => `block ${D.blocks[i]} ${fmt(v, true, own)}`).join(", ");
    let s = `<svg class="blocks" viewBox="0 0 ${W} ${H.toFixed(1)}" role="img" aria-label="score per transformer block: ${esc(label)}">`;
    b.forEach((v, i) => {
      const top = y(Math.max(v, 0)), bottom = y(Math.min(v, 0)), x = L + i * step;
      s += `<rect class="${v >= 0 ? "pos" : "neg"}" x="${(x + step * 0.12).toFixed(1)}" y="${top.toFixed(1)}" width="${Math.max(step * 0.76, 0.8).toFixed(1)}" height="${Math.max(bottom - top, 0.5).toFixed(1)}"><title>block ${D.blocks[i]}: ${fmt(v, true, own)}</title></rect>`;
      if (i % every === 0) s += `<text x="${(x + step / 2).toFixed(1)}" y="${(H - B + 13).toFixed(1)}" text-anchor="middle">${D.blocks[i]}</text>`;
    });
    s += `<line x1="${L}" y1="${y(0).toFixed(1)}" x2="${W - R}" y2="${y(0).toFixed(1)}" class="axis"/>`;
    const ticks = [...new Set([hi, 0, lo])];
    for (const v of ticks) {
      if (v !== 0 && Math.abs(y(v) - y(0)) < 10) continue; // too close to the zero label to read
      s += `<text x="${L - 4}" y="${(y(v) + 4).toFixed(1)}" text-anchor="end">${v === 0 ? "0" : fmt(v, true, own)}</text>`;
    }
    s += `<text x="${L + (W - L - R) / 2}" y="${(H - 3).toFixed(1)}" text-anchor="middle">block</text></svg>`;
    return s;
  }

  // ---- tokens: click, hover, keys ----
  function at(target) {
    const span = target.closest && target.closest(".heat > span");
    if (!span) return null;
    return { k: +span.closest("article.card").dataset.k, i: +span.dataset.i, span };
  }
  function moveTo(k, i, pin) {
    const st = cards.get(k);
    st.cur = i;
    if (pin !== undefined) st.pin = pin;
    paintTokens(k);
    st.heat.children[i].scrollIntoView({ block: "nearest", inline: "nearest" });
    show(k, null);
  }
  document.addEventListener("click", (e) => {
    const hit = at(e.target);
    if (hit) {
      const st = cards.get(hit.k);
      moveTo(hit.k, hit.i, st.pin === hit.i ? null : hit.i);
      return;
    }
    const open = e.target.closest && e.target.closest(".open-doc");
    if (open) openDoc(+open.closest("article.card").dataset.k);
  });
  document.addEventListener("mouseover", (e) => {
    const hit = at(e.target);
    if (hit) show(hit.k, hit.i);
  });
  document.addEventListener("mouseout", (e) => {
    const heat = e.target.closest && e.target.closest(".heat");
    if (heat && !heat.contains(e.relatedTarget)) show(+heat.closest("article.card").dataset.k, null);
  });
  document.addEventListener("focusin", (e) => {
    if (!e.target.classList || !e.target.classList.contains("heat")) return;
    const k = +e.target.closest("article.card").dataset.k, st = cards.get(k);
    if (st && st.cur === null) {
      let best = 0;
      st.values.forEach((v, i) => { if (Math.abs(v) > Math.abs(st.values[best])) best = i; });
      moveTo(k, best);
    }
  });
  document.addEventListener("keydown", (e) => {
    if (!e.target.classList || !e.target.classList.contains("heat")) return;
    const k = +e.target.closest("article.card").dataset.k, st = cards.get(k), n = st.tokens.length;
    const i = st.cur === null ? 0 : st.cur;
    const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: n - 1 }[e.key];
    if (to !== undefined) moveTo(k, Math.max(0, Math.min(n - 1, to)));
    else if (e.key === "Enter" || e.key === " ") moveTo(k, i, st.pin === i ? null : i);
    else if (e.key === "Escape") moveTo(k, i, null);
    else return;
    e.preventDefault();
  });

  // ---- the full document ----
  function openDoc(k) {
    const seq = D.cards[k][0], doc = D.docs[docOf.get(seq)], dialog = document.getElementById("doc-view");
    const parts = [];
    let prev = null;
    for (const [s, chunk, start, end, text] of doc[1]) {
      let t = text;
      if (prev !== null && chunk !== prev.chunk + 1) parts.push(`<span class="gap">[chunks ${prev.chunk + 1} to ${chunk - 1} are not embedded: corpus/sequences.parquet has them]</span>`);
      else if (prev !== null && start > prev.end) parts.push(`<span class="gap" title="characters between two chunks that no sequence holds">[${start - prev.end} characters]</span>`);
      else if (prev !== null && start < prev.end) t = Array.from(t).slice(prev.end - start).join(""); // a character split over two chunks
      parts.push(`<span class="cb" data-label="chunk ${chunk} · seq ${s}"></span>`);
      parts.push(s === seq ? `<mark class="shown">${esc(t)}</mark>` : esc(t));
      prev = { chunk, end };
    }
    dialog.querySelector("#doc-title").textContent = doc[0];
    dialog.querySelector(".doc-info").textContent = `${doc[1].length} chunk(s); the card's chunk (seq ${seq}) is highlighted.`;
    dialog.querySelector(".doc-text").innerHTML = parts.join("");
    dialog.showModal();
    const mark = dialog.querySelector("mark.shown");
    if (mark) mark.scrollIntoView({ block: "center" });
  }

  // ---- the page ----
  function renderAll() {
    for (const card of document.querySelectorAll("article.card")) render(card);
  }
  function setScale(value) {
    mode = value;
    for (const r of document.querySelectorAll('input[name="scale"]')) r.checked = r.value === value;
    for (const k of cards.keys()) paint(k);
  }
  function openTarget() {
    const el = location.hash.length > 1 && document.getElementById(decodeURIComponent(location.hash.slice(1)));
    const details = el && el.closest("details");
    if (details && !details.open) {
      details.open = true;
      el.scrollIntoView();
    }
  }
  async function init() {
    const status = document.getElementById("status");
    const fail = (message) => {
      status.textContent = message;
      status.hidden = false;
    };
    if (typeof DecompressionStream === "undefined") {
      fail("This browser cannot unpack the report's texts (it lacks DecompressionStream: use a browser from 2023 or later). Scores and charts are complete.");
      return;
    }
    try {
      D = await unpack();
    } catch (err) {
      fail("The report's texts could not be unpacked: " + err);
      return;
    }
    D.docs.forEach((doc, i) => {
      for (const chunk of doc[1]) {
        textOf.set(chunk[0], chunk[4]);
        docOf.set(chunk[0], i);
      }
    });
    document.querySelector(".toolbar").hidden = false;
    if (innerWidth < 600) document.querySelector("details.about").open = false; // on a phone the index comes first
    for (const head of document.querySelectorAll("article.card > header")) {
      head.append(Object.assign(document.createElement("button"), { type: "button", className: "open-doc", textContent: "full document" }));
    }
    for (const r of document.querySelectorAll('input[name="scale"]')) r.addEventListener("change", () => setScale(r.value));
    mode = (document.querySelector('input[name="scale"]:checked') || { value: "query" }).value;
    document.getElementById("render-all").addEventListener("click", renderAll);
    const dialog = document.getElementById("doc-view");
    dialog.querySelector(".close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
    const observer = new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (e.isIntersecting) {
          render(e.target);
          observer.unobserve(e.target);
        }
      }
    }, { rootMargin: "600px 0px" });
    for (const card of document.querySelectorAll("article.card")) {
      const box = card.getBoundingClientRect(); // draw what is on screen now, before the first observer callback
      if (box.height > 0 && box.top < innerHeight + 600 && box.bottom > -600) render(card);
      else observer.observe(card);
    }
    window.addEventListener("beforeprint", renderAll);
    window.addEventListener("hashchange", openTarget);
    openTarget();
    document.documentElement.dataset.ready = "yes";
  }
  window.lminfluenceReport = { ready: init(), renderAll, setScale };
})();
