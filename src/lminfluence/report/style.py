"""The report's inline stylesheet: system fonts only, white background, nothing fetched."""

from .plots import COOL, INK, MUTED, WARM, hex_colour, level_css, tint

CSS = f"""
:root {{
  --ink: {INK}; --muted: {MUTED}; --rule: #e4e4e4; --soft: #f6f6f4;
  --warm: {hex_colour(WARM)}; --cool: {hex_colour(COOL)}; --mark: {tint(0.22)};
  --sans: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", "Liberation Sans", Arial, sans-serif;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace;
}}
* {{ box-sizing: border-box; }}
html {{ background: #fff; }}
body {{ margin: 0; color: var(--ink); font: 15px/1.5 var(--sans); background: #fff; }}
main {{ max-width: 1120px; margin: 0 auto; padding: 28px 32px 64px; }}
h1 {{ font-size: 26px; font-weight: 650; margin: 0 0 2px; letter-spacing: -0.01em; }}
h2 {{ font-size: 19px; font-weight: 650; margin: 0 0 10px; }}
h3 {{ font-size: 15px; font-weight: 650; margin: 22px 0 10px; color: #333; }}
h3 .n, summary .n {{ font-weight: 400; color: var(--muted); font-size: 13px; margin-left: 6px; }}
a {{ color: var(--cool); text-decoration: none; }}
a:hover {{ text-decoration: underline; }}
code {{ font-family: var(--mono); font-size: 0.92em; }}
.pos {{ color: var(--warm); }}
.neg {{ color: var(--cool); }}
.note {{ color: var(--muted); font-style: italic; font-size: 13px; margin: 6px 0; }}

header.top {{ border-bottom: 1px solid var(--rule); padding-bottom: 18px; margin-bottom: 22px; }}
.run {{ color: var(--muted); font: 12px/1.4 var(--mono); margin: 0 0 14px; word-break: break-all; }}
dl.summary {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px 22px; margin: 0 0 14px; }}
dl.summary div {{ min-width: 0; }}
dl.summary dt {{ font-size: 11px; text-transform: uppercase; letter-spacing: 0.06em; color: var(--muted); }}
dl.summary dd {{ margin: 0; font-weight: 550; overflow-wrap: anywhere; }}
p.sign {{ background: var(--soft); border-left: 3px solid #bbb; padding: 9px 13px; margin: 0 0 14px; font-size: 14px; max-width: 860px; }}

.legend {{ display: inline-block; font-size: 12px; color: var(--muted); }}
.legend .bar {{ display: block; width: 360px; height: 12px; border: 1px solid #ddd; }}
.legend .ends {{ display: flex; justify-content: space-between; width: 360px; margin-top: 3px; line-height: 1.25; }}
.legend .ends span:last-child {{ text-align: right; }}
.legend .ends span:nth-child(2) {{ align-self: flex-start; }}

table.index {{ width: 100%; border-collapse: collapse; font-size: 13.5px; }}
table.index th {{ text-align: left; font-weight: 600; color: #444; border-bottom: 1.5px solid #bbb; padding: 6px 8px; white-space: nowrap; }}
table.index td {{ border-bottom: 1px solid var(--rule); padding: 6px 8px; vertical-align: top; }}
table.index tr:hover td {{ background: #fafafa; }}
table.index td.num {{ text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }}
table.index td.pc {{ font-family: var(--mono); font-size: 12.5px; }}
table.index td.doc {{ font-family: var(--mono); font-size: 12.5px; overflow-wrap: anywhere; }}
mark.completion {{ background: var(--mark); color: inherit; border-radius: 2px; padding: 0 1px; font-weight: 600; }}

section.query {{ border-top: 1px solid var(--rule); margin-top: 34px; padding-top: 22px; }}
section.query h2 .qid {{ font-family: var(--mono); }}
a.back {{ font-size: 12px; font-weight: 400; margin-left: 10px; }}
pre.qa {{ font: 14px/1.55 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; background: var(--soft);
  border: 1px solid var(--rule); border-radius: 4px; padding: 10px 13px; margin: 0 0 8px; }}
pre.qa .prompt {{ color: #444; }}
p.stats {{ font-size: 13px; color: #444; margin: 0 0 8px; font-variant-numeric: tabular-nums; }}
figure {{ margin: 0; }}
figure.dist figcaption, figure.side figcaption {{ font-size: 12px; color: var(--muted); }}
svg {{ display: block; font-family: var(--sans); overflow: visible; }}

.card {{ border: 1px solid #dcdcdc; border-radius: 6px; margin: 0 0 14px; background: #fff;
  content-visibility: auto; contain-intrinsic-size: auto 220px; }}  /* long reports: lay out cards near the viewport only */
.card-head {{ display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 14px; padding: 7px 12px;
  border-bottom: 1px solid #ececec; background: #fbfbfa; border-radius: 6px 6px 0 0; font-size: 13px; }}
.card-head .rank {{ font-weight: 700; color: #555; min-width: 26px; }}
.card-head .score {{ font: 600 14px var(--mono); }}
.card-head .prov {{ font-family: var(--mono); font-size: 12.5px; color: #444; overflow-wrap: anywhere; }}
.card-head .extra {{ color: var(--muted); font-size: 12px; margin-left: auto; }}
.card-body {{ display: flex; gap: 18px; padding: 10px 12px; align-items: flex-start; }}
.card-main {{ flex: 1; min-width: 0; }}
.text {{ font: 13px/1.75 var(--mono); white-space: pre-wrap; overflow-wrap: anywhere; max-height: 26em; overflow-y: auto; }}
.text.plain {{ color: #333; }}
span.tok {{ border-radius: 2px; padding: 1px 0; }}
span.tok .nl {{ opacity: 0.45; font-size: 0.85em; }}
{level_css()}
span.tok:hover {{ outline: 1px solid #333; }}
p.cap {{ font-size: 12px; color: var(--muted); margin: 6px 0 0; }}
figure.side {{ flex: 0 0 250px; }}
figure.side figcaption {{ text-align: center; }}

details.negative {{ margin-top: 14px; }}
details.negative > summary {{ cursor: pointer; font-weight: 650; font-size: 15px; color: #333; margin-bottom: 10px; }}
footer {{ margin-top: 48px; padding-top: 12px; border-top: 1px solid var(--rule); color: var(--muted); font-size: 12px; }}
@media (max-width: 760px) {{ .card-body {{ flex-direction: column; }} figure.side {{ flex-basis: auto; }} }}
"""
