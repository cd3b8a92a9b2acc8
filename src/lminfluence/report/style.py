"""The report's inline stylesheet: system fonts only, white background, nothing fetched.

Every text colour meets WCAG AA (4.5:1) on its background (colours.py; tests compute it).
"""

from .colours import CARD_HEAD, COOL, INK, MUTED, NEG_TEXT, POS_TEXT, WARM, hex_colour, level_css, tint

CSS = f"""
:root {{
  --ink: {INK}; --muted: {MUTED}; --rule: #e4e4e4; --soft: #f6f6f4; --head: {CARD_HEAD};
  --warm: {hex_colour(WARM)}; --cool: {hex_colour(COOL)}; --pos: {POS_TEXT}; --neg: {NEG_TEXT}; --mark: {tint(0.22)};
  --sans: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", "Liberation Sans", Arial, sans-serif;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace;
}}
* {{ box-sizing: border-box; }}
html {{ background: #fff; scroll-padding-top: 48px; }}
body {{ margin: 0; color: var(--ink); font: 15px/1.5 var(--sans); background: #fff; }}
main {{ max-width: 1180px; margin: 0 auto; padding: 20px 32px 64px; }}
h1 {{ font-size: 25px; font-weight: 650; margin: 0 0 2px; letter-spacing: -0.01em; overflow-wrap: anywhere; }}
h1 .model {{ font-family: var(--mono); font-size: 0.8em; font-weight: 500; color: #444; margin-left: 6px; }}
h2 {{ font-size: 19px; font-weight: 650; margin: 0 0 10px; overflow-wrap: anywhere; }}
h3 {{ font-size: 15px; font-weight: 650; margin: 22px 0 10px; color: #333; }}
h4 {{ font-size: 14px; font-weight: 600; margin: 18px 0 6px; }}
.n {{ font-weight: 400; color: var(--muted); font-size: 13px; margin-left: 6px; }}
a {{ color: var(--neg); text-decoration: none; }}
a:hover, a:focus-visible {{ text-decoration: underline; }}
code {{ font-family: var(--mono); font-size: 0.92em; }}
.pos {{ color: var(--pos); }}
.neg {{ color: var(--neg); }}
.note {{ color: var(--muted); font-size: 13px; margin: 6px 0; }}
.banner {{ background: #fff8e6; border: 1px solid #ecd9a8; color: #4a3b10; padding: 8px 12px; margin: 0; }}

.toolbar {{ position: sticky; top: 0; z-index: 5; display: flex; flex-wrap: wrap; gap: 4px 16px; align-items: center;
  padding: 6px 32px; background: rgba(255,255,255,0.96); border-bottom: 1px solid var(--rule); font-size: 13px; }}
.toolbar[hidden] {{ display: none; }}
.toolbar fieldset {{ border: 0; margin: 0; padding: 0; display: flex; flex-wrap: wrap; gap: 2px 10px; align-items: center; }}
.toolbar legend {{ float: left; color: var(--muted); margin-right: 6px; padding: 0; }}
.toolbar label {{ white-space: nowrap; cursor: pointer; }}
button {{ font: inherit; font-size: 12.5px; color: var(--ink); background: #f3f3f1; border: 1px solid #c9c9c5; border-radius: 4px;
  padding: 2px 9px; cursor: pointer; }}
button:hover {{ background: #e9e9e5; }}

header.top {{ border-bottom: 1px solid var(--rule); padding-bottom: 16px; margin-bottom: 22px; }}
.run {{ color: var(--muted); font: 12px/1.4 var(--mono); margin: 0 0 12px; overflow-wrap: anywhere; }}
dl.summary {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 8px 22px; margin: 0 0 12px; }}
dl.summary div {{ min-width: 0; }}
dl.summary dt {{ font-size: 11px; text-transform: uppercase; letter-spacing: 0.06em; color: var(--muted); }}
dl.summary dd {{ margin: 0; font-weight: 550; overflow-wrap: anywhere; }}
details.about > summary {{ cursor: pointer; color: var(--muted); font-size: 13px; margin-bottom: 8px; }}
p.layers {{ font-size: 13px; margin: 0 0 12px; overflow-wrap: anywhere; }}
p.sign {{ background: var(--soft); border-left: 3px solid #bbb; padding: 8px 13px; margin: 0 0 10px; font-size: 14px; max-width: 880px; }}
.legend {{ font-size: 12px; color: var(--muted); max-width: 380px; }}
.legend .bar {{ display: block; height: 12px; border: 1px solid #ddd; }}
.legend .ends {{ display: flex; justify-content: space-between; gap: 8px; margin-top: 3px; line-height: 1.25; }}

.scroll {{ overflow-x: auto; max-width: 100%; }}
table {{ border-collapse: collapse; font-size: 13.5px; }}
table.index, table.compare {{ width: 100%; }}
th {{ text-align: left; font-weight: 600; color: #444; border-bottom: 1.5px solid #bbb; padding: 6px 8px; vertical-align: bottom; white-space: nowrap; }}
td {{ border-bottom: 1px solid var(--rule); padding: 5px 8px; vertical-align: top; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; font-family: var(--mono); font-size: 12.5px; }}
td.pc {{ font-family: var(--mono); font-size: 12.5px; min-width: 12em; overflow-wrap: anywhere; }}
td.doc, td.qid {{ font-family: var(--mono); font-size: 12.5px; white-space: nowrap; }}
td small {{ font-family: var(--sans); color: var(--muted); }}
mark.completion {{ background: var(--mark); color: inherit; border-radius: 2px; padding: 0 1px; font-weight: 600; }}
table.compare tr.shared td {{ background: #fff1e6; }}
table.compare td.scan {{ font-style: italic; color: var(--muted); }}
table.compare.small {{ width: auto; }}

section.query, section.compare {{ border-top: 1px solid var(--rule); margin-top: 34px; padding-top: 20px; }}
section.query h2 .qid {{ font-family: var(--mono); }}
.tags {{ font-size: 13px; font-weight: 400; color: var(--muted); }}
a.back {{ font-size: 12px; font-weight: 400; margin-left: 10px; }}
pre.qa {{ font: 14px/1.55 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; background: var(--soft);
  border: 1px solid var(--rule); border-radius: 4px; padding: 10px 13px; margin: 0 0 8px; }}
pre.qa .prompt {{ color: #444; }}
p.stats {{ font-size: 13px; color: #444; margin: 0 0 8px; font-variant-numeric: tabular-nums; }}
figure {{ margin: 0; min-width: 0; }}
figcaption {{ font-size: 12px; color: var(--muted); }}
.charts {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 14px 24px; margin: 8px 0 4px; }}
svg {{ display: block; font-family: var(--sans); overflow: visible; }}
svg.hist rect.w {{ fill: {tint(0.5)}; }}
svg.hist rect.c {{ fill: {tint(-0.5)}; }}
svg.hist rect.m {{ fill: #c8c8c8; }}
svg.chart {{ width: 100%; max-width: 440px; height: auto; }}

.card {{ border: 1px solid #dcdcdc; border-radius: 6px; margin: 0 0 14px; background: #fff;
  content-visibility: auto; contain-intrinsic-size: auto 230px; }}
.card:target {{ border-color: #888; box-shadow: 0 0 0 2px #bbb; }}
.card > header {{ display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 14px; padding: 7px 12px;
  border-bottom: 1px solid #ececec; background: var(--head); border-radius: 6px 6px 0 0; font-size: 13px; }}
.card > header .rank {{ font-weight: 700; color: #555; min-width: 26px; }}
.card > header .score {{ font: 600 14px var(--mono); }}
.card > header .prov {{ font-family: var(--mono); font-size: 12.5px; color: #444; overflow-wrap: anywhere; min-width: 0; }}
.card > header .extra {{ color: var(--muted); font-size: 12px; }}
.card > header .open-doc {{ margin-left: auto; }}
.badge {{ border-radius: 3px; font-size: 11.5px; padding: 0 6px; }}
.badge.spurious {{ background: #fff3cd; color: #5c4200; border: 1px solid #e0c060; }}
.card > div {{ display: flex; gap: 18px; padding: 10px 12px; align-items: flex-start; min-height: 60px; }}
.card-main {{ flex: 1; min-width: 0; }}
.heat {{ font: 13px/1.75 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; max-height: 26em; overflow-y: auto; }}
.heat:focus-visible {{ outline: 2px solid #555; outline-offset: 2px; }}
.heat span {{ border-radius: 2px; padding: 1px 0; cursor: pointer; }}
.heat span.e {{ display: inline-block; width: 3px; height: 1.1em; vertical-align: text-bottom; padding: 0; }}
.heat span.nl::before {{ content: "↵"; opacity: 0.5; font-size: 0.85em; }}
.heat span.cur {{ outline: 1.5px solid #333; }}
.heat span.pin {{ outline: 2.5px solid #000; outline-offset: 1px; }}
{level_css()}
p.tokinfo {{ font: 12.5px/1.45 var(--mono); margin: 6px 0 0; padding: 3px 7px; background: var(--soft); min-height: 1.9em; overflow-wrap: anywhere; }}
p.cap {{ font-size: 12px; color: var(--muted); margin: 4px 0 0; }}
figure.side {{ flex: 0 0 250px; }}
figure.side svg {{ width: 100%; height: auto; }}
svg.blocks text {{ font-size: 10px; fill: var(--muted); }}
svg.blocks rect.pos {{ fill: {tint(0.8)}; }}
svg.blocks rect.neg {{ fill: {tint(-0.8)}; }}
svg.blocks line.axis {{ stroke: #9a9a9a; }}
figure.side figcaption {{ text-align: center; }}

details.negative {{ margin-top: 12px; }}
details.negative > summary {{ cursor: pointer; margin-bottom: 10px; }}
details.negative > summary h3 {{ display: inline; margin: 0; }}
.group {{ margin-bottom: 26px; }}
dialog#doc-view {{ width: min(920px, 96vw); max-height: 88vh; border: 1px solid #999; border-radius: 6px; padding: 14px 18px; }}
dialog#doc-view::backdrop {{ background: rgba(0,0,0,0.35); }}
.doc-head {{ display: flex; gap: 12px; align-items: baseline; justify-content: space-between; }}
.doc-head h2 {{ font-family: var(--mono); font-size: 16px; margin: 0; }}
.doc-text {{ font: 13px/1.7 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; }}
.doc-text mark {{ background: var(--mark); color: inherit; }}
.doc-text .cb::before {{ content: attr(data-label); display: block; color: var(--muted); font-size: 11px; border-top: 1px dashed #ccc; margin-top: 6px; }}
.doc-text .gap {{ color: var(--muted); font-style: italic; }}
footer {{ margin-top: 48px; padding-top: 12px; border-top: 1px solid var(--rule); color: var(--muted); font-size: 12px; }}
@media (max-width: 760px) {{
  main {{ padding: 12px 12px 48px; }}
  .toolbar {{ padding: 6px 12px; position: static; }}
  .card > div {{ flex-direction: column; }}
  figure.side {{ flex-basis: auto; width: 100%; max-width: 320px; }}
  dl.summary {{ grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 6px 14px; }}
  h1 {{ font-size: 21px; }}
  table.index .opt {{ display: none; }}  /* #, log p and α: the section of each query has them */
}}
@media print {{ .toolbar, button {{ display: none; }} .card {{ content-visibility: visible; break-inside: avoid; }} }}
"""
