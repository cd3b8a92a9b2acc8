"""Real English text for benchmarks, from Debian packages, cached on disk.

Two public-domain corpora that Debian ships as ordinary packages:

- ``r-cran-janeaustenr``: Jane Austen's six novels, as R character vectors
  (one line of text per element) in R's lazy-load database
  (``data/Rdata.rdx`` + ``Rdata.rdb``);
- ``sword-text-kjv``: the King James Bible as a SWORD ``zText`` module
  (zlib-compressed OSIS XML, one block per book).

Each package is fetched with ``apt-get download`` and unpacked with
``dpkg -x`` into a cache directory (``.cache/corpora`` by default, git-ignored);
a second call reads the cache and needs neither tool. Python's own
``pydoc_data`` (the language reference's prose, in every installation) is
the fallback when a package cannot be fetched, so a benchmark always has
real text to run on; which sources were used is reported.

Documents are chapters (Austen) and chapters (Bible), and pydoc topics;
``token_sequences`` cuts them into fixed-length token sequences.

For the paper study (``paper_study.py``) the module also reads Python's own
sources (``stdlib_code_documents``), the Bible verse by verse in two
translations aligned by their shared versification (``aligned_verses``:
``sword-text-kjv`` and the Spanish ``sword-text-sparv``), and LibreOffice's
help pages in several languages, aligned by page and paragraph id
(``libreoffice_pages``: ``libreoffice-help-<lang>``).

Usage::

    from corpora import load_documents, token_sequences
    docs = load_documents(Path(".cache/corpora"))       # [Document(source, id, text)]
    seqs = token_sequences(tokenizer, docs, 256, 256)    # [[token ids], ...]
"""

from __future__ import annotations

import gzip
import logging
import random
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "corpora"


@dataclass(frozen=True)
class Document:
    source: str  # "austen", "kjv" or "pydoc"
    id: str
    text: str


# --------------------------------------------------------------- fetching


def fetch_debian(package: str, cache: Path) -> Path | None:
    """The unpacked root of a Debian package (``apt-get download`` + ``dpkg -x``), cached; None when unavailable."""
    root = cache / package
    done = root / ".unpacked"
    if done.is_file():
        return root
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        logger.warning("%s: apt-get/dpkg not found", package)
        return None
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True, timeout=300)
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=300)
    except (subprocess.SubprocessError, OSError, IndexError) as e:
        logger.warning("%s: could not fetch or unpack (%s)", package, e)
        return None
    done.write_text(package + "\n")
    return root


# ---------------------------------------------------- R's serialization


class _RReader:
    """Just enough of R's XDR serialization (format 2 and 3) for vectors, lists and attributes."""

    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _bytes(self, n: int) -> bytes:
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def read(self):
        if self._bytes(2) != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        version = self._int()
        self._int(), self._int()  # writer and minimal reader versions
        if version == 3:
            self._bytes(self._int())  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 247, 242, 241):  # NULL and the special environments
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[((flags >> 8) or self._int()) - 1]
        if kind == 1:  # symbol
            sym = self._item()
            self.refs.append(sym)
            return sym
        if kind in (2, 6, 239, 240):  # pairlists: [(tag, value), ...]
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            head, tail = self._item(), self._item()
            return [(tag, head)] + (tail if isinstance(tail, list) else [])
        if kind == 9:  # CHARSXP
            n = self._int()
            return None if n == -1 else self._bytes(n).decode("utf-8", "replace")
        if kind in (10, 13, 14, 16, 19, 20):  # logical, integer, double, character, list, expression
            n = self._int()
            if n == -1:
                n = (self._int() << 32) + self._int()
            if kind in (10, 13, 14):
                fmt = "d" if kind == 14 else "i"
                value = list(struct.unpack_from(f">{n}{fmt}", self.buf, self.pos))
                self.pos += n * struct.calcsize(fmt)
            else:
                value = [self._item() for _ in range(n)]
            attrs = dict(self._item()) if has_attr else {}
            return {"value": value, "attrs": attrs} if attrs else value
        raise ValueError(f"R object type {kind} is not supported by this reader")


def read_r_lazyload(rdx: Path) -> dict[str, object]:
    """Every object of an R lazy-load database (``X.rdx`` + ``X.rdb``), by name."""
    index = _RReader(gzip.decompress(rdx.read_bytes())).read()
    entries = dict(zip(index["attrs"]["names"], index["value"]))["variables"]
    rdb = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(entries["attrs"]["names"], entries["value"]):
        raw = rdb[offset : offset + length]
        out[name] = _RReader(zlib.decompress(raw[4:])).read()  # 4 bytes of length, then zlib
    return out


# ------------------------------------------------------------ the corpora


def _paragraphs(lines: list[str]) -> str:
    """Lines of a printed book → paragraphs separated by blank lines, each on one line."""
    paras, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    if current:
        paras.append(" ".join(current))
    return "\n\n".join(paras)


def austen_documents(cache: Path) -> list[Document]:
    """Jane Austen's novels, one document per chapter."""
    root = fetch_debian("r-cran-janeaustenr", cache)
    if root is None:
        return []
    rdx = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdx"), None)
    if rdx is None:
        logger.warning("r-cran-janeaustenr: no data/Rdata.rdx in the package")
        return []
    docs = []
    for book, lines in read_r_lazyload(rdx).items():
        lines = lines["value"] if isinstance(lines, dict) else lines
        chapters: list[list[str]] = [[]]
        for line in lines:
            if re.match(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b", line or "", re.IGNORECASE):
                chapters.append([])
            chapters[-1].append(line or "")
        for i, chapter in enumerate(chapters):
            text = _paragraphs(chapter)
            if len(text) > 200:
                docs.append(Document("austen", f"{book}/{i:03d}", text))
    return docs


def kjv_documents(cache: Path) -> list[Document]:
    """The King James Bible, one document per chapter (OSIS markup and footnotes removed)."""
    root = fetch_debian("sword-text-kjv", cache)
    if root is None:
        return []
    docs = []
    for bzs in sorted(root.glob("usr/share/sword/modules/texts/ztext/*/*.bzs")):
        index, blocks = bzs.read_bytes(), bzs.with_suffix(".bzz").read_bytes()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack_from("<III", index, 12 * i)  # little-endian block index
            xml = zlib.decompress(blocks[offset : offset + size]).decode("utf-8", "replace")
            xml = re.sub(r"<note\b.*?</note>", "", xml, flags=re.S)
            for chapter in re.split(r'<chapter\b[^>]*\bsID="', xml)[1:]:
                ref = chapter.split('"', 1)[0]
                text = re.sub(r"<[^>]*>", "", chapter.split(">", 1)[1]).replace("¶", " ")
                text = re.sub(r"\s+", " ", text).strip()
                if len(text) > 200:
                    docs.append(Document("kjv", ref, text))
    return docs


def pydoc_documents() -> list[Document]:
    """The Python language reference's topics (``pydoc_data``), always available."""
    from pydoc_data.topics import topics

    return [Document("pydoc", k, v) for k, v in sorted(topics.items()) if len(v) > 200]


def load_documents(cache: Path = DEFAULT_CACHE, sources: tuple[str, ...] = ("austen", "kjv")) -> list[Document]:
    """Documents of the corpora that could be fetched (``austen``, ``kjv``, ``pydoc``, ``code``); pydoc_data when none could."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    readers = {"austen": austen_documents, "kjv": kjv_documents, "pydoc": lambda _: pydoc_documents(), "code": lambda _: stdlib_code_documents()}
    docs = [d for s in sources for d in readers[s](cache)]
    if not docs:
        logger.warning("no Debian corpus available: using Python's pydoc_data instead")
        docs = pydoc_documents()
    return docs


def token_sequences(
    tokenizer, documents: list[Document], num: int, length: int, seed: int = 0, per_document: int = 2
) -> list[list[int]]:
    """``num`` sequences of exactly ``length`` token ids, cut from documents in a seeded random order.

    The sources take turns (one document of each in turn) so that every
    source is represented, and each document gives at most ``per_document``
    sequences (from its start); a sequence never crosses a document boundary
    and starts with the tokenizer's BOS token when it has one.
    Raises ValueError when the documents hold too few tokens.
    """
    rng = random.Random(seed)
    by_source: dict[str, list[Document]] = {}
    for d in documents:
        by_source.setdefault(d.source, []).append(d)
    for docs in by_source.values():
        rng.shuffle(docs)
    order = [d for group in zip(*by_source.values()) for d in group]
    out: list[list[int]] = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for doc in order:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        step = length - len(bos)
        for start in range(0, min(len(ids) - step + 1, per_document * step), step):
            out.append(bos + ids[start : start + step])
            if len(out) == num:
                return out
    raise ValueError(f"the documents hold only {len(out)} sequences of {length} tokens, {num} asked for")


# ------------------------------------------- code and aligned multilingual text


def stdlib_code_documents(max_chars: int = 20000) -> list[Document]:
    """Python's standard-library modules (``*.py`` at the top level of the stdlib), one document per file, cut at ``max_chars``."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > 400 and not path.name.startswith("_"):
            docs.append(Document("code", path.name, text[:max_chars]))
    return docs


@dataclass(frozen=True)
class Verse:
    ref: str  # OSIS reference, e.g. "Gen.1.1"
    text: str


def sword_verses(package: str, cache: Path) -> list[Verse] | None:
    """Every entry of a SWORD zText module's verse index, in index order (OT then NT), markup removed.

    Entry i of two modules with the same versification is the same verse, which
    aligns two translations verse by verse. Entries that hold no verse (module,
    book and chapter headings) have ref "" and are kept so that indices line up.
    None when the package cannot be fetched.
    """
    root = fetch_debian(package, cache)
    if root is None:
        return None
    found = sorted(root.glob("usr/share/sword/modules/texts/ztext/*/"))
    if not found:
        logger.warning("%s: no zText module in the package", package)
        return None
    out: list[Verse] = []
    for testament in ("ot", "nt"):
        bzv, bzs, bzz = ((found[0] / f"{testament}.{x}").read_bytes() for x in ("bzv", "bzs", "bzz"))
        blocks: dict[int, bytes] = {}
        chapter, verse = "", 0
        for i in range(len(bzv) // 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, 10 * i)  # block, offset in it, size
            raw = b""
            if size:
                if block not in blocks:
                    start, length, _ = struct.unpack_from("<III", bzs, 12 * block)
                    blocks[block] = zlib.decompress(bzz[start : start + length])
                raw = blocks[block][offset : offset + size]
            xml = raw.decode("utf-8", "replace")
            heading = re.search(r'<chapter\b[^>]*\bosisID="([^"]+)"', xml)
            if heading or "<div" in xml and 'type="book"' in xml:
                chapter, verse = (heading.group(1) if heading else ""), 0
                out.append(Verse("", ""))
                continue
            verse += 1
            text = re.sub(r"<note\b.*?</note>", "", xml, flags=re.S)
            text = re.sub(r"\s+", " ", re.sub(r"<[^>]*>", "", text).replace("¶", " ")).strip()
            out.append(Verse(f"{chapter}.{verse}" if chapter else "", text))
    return out


def aligned_verses(cache: Path, packages: tuple[str, str] = ("sword-text-kjv", "sword-text-sparv")) -> list[tuple[str, str, str]] | None:
    """(ref, first translation's text, second's) for every verse both modules hold; None when one cannot be fetched.

    Raises ValueError when the two modules' verse indices differ in length (different versifications).
    """
    a, b = (sword_verses(p, cache) for p in packages)
    if a is None or b is None:
        return None
    if len(a) != len(b):
        raise ValueError(f"{packages[0]} has {len(a)} index entries, {packages[1]} {len(b)}: not the same versification")
    return [(x.ref, x.text, y.text) for x, y in zip(a, b) if x.ref and x.text and y.text]


class _HelpPage(HTMLParser):
    """The text of a LibreOffice help page's display area, and its paragraphs by id."""

    BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "div", "pre"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # > 0 inside <div id="DisplayArea">
        self.skip = 0  # > 0 inside <script>/<style>
        self.parts: list[str] = []
        self.paragraphs: dict[str, str] = {}
        self.open: list[tuple[str, str, int]] = []  # (tag, id, where its text starts in parts)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "style"):
            self.skip += 1
        if self.depth == 0:
            if tag == "div" and a.get("id") == "DisplayArea":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")
            if a.get("id"):
                self.open.append((tag, a["id"], len(self.parts)))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        if self.depth == 0:
            return
        if self.open and self.open[-1][0] == tag:
            _, ident, start = self.open.pop()
            self.paragraphs[ident] = re.sub(r"\s+", " ", "".join(self.parts[start:])).strip()
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(self.parts).split("\n"))
        return "\n".join(line for line in lines if line)


def help_page(html: str) -> tuple[str, dict[str, str]]:
    """(text, paragraph id → text) of one LibreOffice help page."""
    parser = _HelpPage()
    parser.feed(html)
    parser.close()
    return parser.text(), parser.paragraphs


def libreoffice_pages(language: str, cache: Path) -> dict[str, tuple[str, dict[str, str]]] | None:
    """Help pages of ``libreoffice-help-<language>`` (e.g. en-us, de, zh-cn): relative path → (text, paragraphs by id).

    The same relative path (``text/swriter/guide/table_insert.html``) is the same
    page in every language, and a paragraph keeps its id across translations.
    None when the package cannot be fetched.
    """
    root = fetch_debian(f"libreoffice-help-{language}", cache)
    if root is None:
        return None
    found = [d for d in sorted((root / "usr/share/libreoffice/help").glob("*")) if d.name.lower() == language.lower()]
    if not found:
        logger.warning("libreoffice-help-%s: no help folder for %s", language, language)
        return None
    pages = {}
    for path in sorted(found[0].rglob("*.html")):
        pages[str(path.relative_to(found[0]))] = help_page(path.read_text(encoding="utf-8", errors="replace"))
    return pages


__all__ = [
    "Document", "DEFAULT_CACHE", "fetch_debian", "read_r_lazyload", "austen_documents", "kjv_documents", "pydoc_documents",
    "load_documents", "token_sequences", "stdlib_code_documents", "Verse", "sword_verses", "aligned_verses", "help_page",
    "libreoffice_pages",
]
