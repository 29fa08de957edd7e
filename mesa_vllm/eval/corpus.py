"""Real English text for perplexity: the Python documentation as plain prose.

``build_pydoc_corpus()`` converts the HTML pages of Debian's ``python3-doc`` package (installed
under ``/usr/share/doc/python3/html``) to plain text with the standard library's
``html.parser``: scripts, styles, navigation, sidebars, footers, code blocks (``<pre>``) and API
signatures are dropped; paragraphs, headings, list items and table cells are kept, one per line.
One document per HTML page (index, search and table-of-contents pages left out), in sorted path
order, documents separated by a blank line.  The text goes to a cache file (default
``~/.cache/mesa_vllm/corpus/pydoc.txt``) with a JSON provenance sidecar beside it
(``pydoc.txt.json``: package names and versions from ``dpkg-query``, documents, characters,
sha256 of the text).

Command line (also ``mesa-vllm eval corpus pydoc``)::

    python -m mesa_vllm.eval corpus pydoc [--out FILE] [--html-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE = "python3-doc"
CONVERTER = "mesa_vllm.eval.corpus/1"
DEFAULT_HTML_DIRS = ("/usr/share/doc/python3/html", "/usr/share/doc/python3-doc/html")

# Elements whose whole content is dropped.
_SKIP_TAGS = frozenset(
    {"script", "style", "noscript", "template", "head", "nav", "pre", "form", "button", "svg"}
    | {"header", "footer", "select", "textarea", "iframe", "object"}
)
# Classes (of any element) whose content is dropped: Sphinx navigation, API signatures,
# permalink marks, code blocks, the mobile menu.
_SKIP_CLASSES = frozenset(
    {"related", "sphinxsidebar", "footer", "mobile-nav", "menu-wrapper", "headerlink"}
    | {"highlight", "doctest", "sig", "toctree-wrapper", "navigation", "breadcrumbs"}
    | {"version_switcher_placeholder", "language_switcher_placeholder", "copybutton"}
)
_SKIP_ROLES = frozenset({"navigation", "search", "banner", "contentinfo"})
# Elements that end a line of text.
_BLOCK_TAGS = frozenset(
    {"p", "div", "section", "article", "main", "aside", "blockquote", "li", "ul", "ol", "dl"}
    | {"dt", "dd", "table", "tr", "td", "th", "caption", "figure", "figcaption", "br", "hr"}
    | {"h1", "h2", "h3", "h4", "h5", "h6", "body", "html", "address", "details", "summary"}
)
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param"}
    | {"source", "track", "wbr"}
)
# Pages that are lists of links, not prose.
_SKIP_PAGES = re.compile(r"(^|/)(genindex[^/]*|search|py-modindex|contents)\.html$")
_WS = re.compile(r"\s+")


class CorpusError(RuntimeError):
    """The corpus cannot be built or read (one-line message)."""


class _TextParser(html.parser.HTMLParser):
    """Collects the prose lines of one HTML page (see ``html_to_text``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skips, is main)
        self.skip = 0  # open elements that drop their content
        self.main = 0  # open role="main" elements
        self.seen_main = False
        self.buf: list[str] = []
        self.lines: list[str] = []
        self.main_lines: list[str] = []

    def _flush(self) -> None:
        text = _WS.sub(" ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.lines.append(text)
            if self.main:
                self.main_lines.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        classes = set(a.get("class", "").split())
        skips = (
            tag in _SKIP_TAGS
            or bool(classes & _SKIP_CLASSES)
            or a.get("role", "") in _SKIP_ROLES
            or "hidden" in a
            or a.get("aria-hidden") == "true"
        )
        is_main = a.get("role") == "main" or tag == "main"
        self.stack.append((tag, skips, is_main))
        self.skip += skips
        self.main += is_main
        self.seen_main |= is_main

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()
        if not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag
        while self.stack:  # close unclosed children too
            t, skips, is_main = self.stack.pop()
            self.skip -= skips
            self.main -= is_main
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.buf.append(data)

    def result(self) -> str:
        self._flush()
        return "\n".join(self.main_lines if self.seen_main else self.lines)


def html_to_text(page: str) -> str:
    """Plain prose of one HTML page: one line per paragraph, heading, list item or cell.

    Only the ``role="main"`` (or ``<main>``) part when the page has one; scripts, styles,
    navigation, headers/footers, ``<pre>`` code blocks, Sphinx signatures (``class="sig"``)
    and permalink marks are dropped; runs of whitespace become one space.
    """
    p = _TextParser()
    p.feed(page)
    p.close()
    return p.result()


def _dpkg_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _dpkg_owner(path: Path) -> str | None:
    """The Debian package that installed ``path`` (``dpkg -S``), or None."""
    try:
        out = subprocess.run(["dpkg", "-S", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or ":" not in out.stdout:
        return None
    return out.stdout.split(":", 1)[0].split(",")[0].strip() or None


def _dpkg_html_dirs(package: str) -> list[str]:
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln for ln in out.stdout.splitlines() if ln.rstrip("/").endswith("/html")]


def find_pydoc_html(html_dir: str | Path | None = None) -> Path:
    """The directory holding the Python documentation's ``index.html`` (symlinks resolved).

    ``html_dir`` if given, else the ``html`` directories that ``dpkg -L python3-doc`` lists,
    else ``/usr/share/doc/python3*/html``; CorpusError naming ``apt-get install python3-doc``.
    """
    if html_dir is not None:
        cands = [str(html_dir)]
    else:
        cands = [*_dpkg_html_dirs(PACKAGE), *DEFAULT_HTML_DIRS]
        cands += sorted(str(p) for p in Path("/usr/share/doc").glob("python3*/html"))
    for c in cands:
        p = Path(c)
        if (p / "index.html").is_file():
            return p.resolve()
    where = str(html_dir) if html_dir is not None else ", ".join(DEFAULT_HTML_DIRS)
    raise CorpusError(
        f"no Python HTML documentation found (looked in {where}); install it with "
        f"`apt-get install -y {PACKAGE}` (Debian/Ubuntu) or pass --html-dir DIR"
    )


def html_pages(root: Path) -> list[Path]:
    """The HTML pages under ``root`` that hold prose, in sorted relative-path order."""
    pages = []
    for p in root.rglob("*.html"):
        rel = p.relative_to(root).as_posix()
        if rel.startswith("_") or "/_" in rel or _SKIP_PAGES.search(rel):
            continue  # _static, _sources, _downloads; index/search pages
        pages.append((rel, p))
    return [p for _, p in sorted(pages)]


def documents(root: Path) -> Iterable[str]:
    """The plain text of every prose page under ``root`` (empty pages left out)."""
    for page in html_pages(root):
        text = html_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if text:
            yield text


def default_path() -> Path:
    """``$XDG_CACHE_HOME/mesa_vllm/corpus/pydoc.txt`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesa_vllm" / "corpus" / "pydoc.txt"


def sidecar_path(path: str | Path) -> Path:
    """The provenance file of corpus ``path``: ``PATH.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def build_pydoc_corpus(
    out_path: str | Path | None = None, html_dir: str | Path | None = None
) -> Path:
    """Build the plain-text Python-documentation corpus; returns its path.

    Writes ``out_path`` (default ``default_path()``) and its provenance sidecar
    (``sidecar_path``).  Deterministic: the same installed package gives the same bytes.
    CorpusError when the HTML is absent (the message names ``apt-get install python3-doc``).
    """
    root = find_pydoc_html(html_dir)
    docs = list(documents(root))
    if not docs:
        raise CorpusError(f"no text found in the HTML pages under {root}")
    text = "\n\n".join(docs) + "\n"
    out = Path(out_path) if out_path is not None else default_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    owner = _dpkg_owner(root / "index.html")
    prov: dict[str, Any] = {
        "source": "debian-package",
        "package": PACKAGE,
        "version": _dpkg_version(PACKAGE),
        "html_package": owner,
        "html_package_version": _dpkg_version(owner) if owner else None,
        "html_dir": str(root),
        "converter": CONVERTER,
        "documents": len(docs),
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }
    sidecar_path(out).write_text(json.dumps(prov, indent=1) + "\n")
    return out


def load_corpus(path: str | Path) -> str:
    """The text of a corpus file (any UTF-8 text file); CorpusError if it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read corpus {path}: {exc}") from None


def provenance(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of corpus ``path`` as a dict, None when it has none (or it is unreadable)."""
    try:
        obj = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _encode_plain(tok: Any, text: str) -> list[int]:
    try:
        return list(tok.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer with a bare encode(text)
        return list(tok.encode(text))


def bos_prefix(tok: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer puts a BOS token before a text, else ``[]``."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if list(tok.encode(""))[:1] == [bos] else []


def tokenize(tok: Any, text: str, chunk_chars: int = 1 << 20) -> list[int]:
    """Token ids of ``text`` without special tokens, encoded in chunks split at document
    boundaries (blank lines) so a multi-megabyte corpus needs no single giant call."""
    groups, cur, size = [], [], 0
    for doc in text.split("\n\n"):
        cur.append(doc)
        size += len(doc) + 2
        if size >= chunk_chars:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    # every chunk but the last keeps the blank line that separates it from the next
    chunks = [
        "\n\n".join(g) + ("\n\n" if i < len(groups) - 1 else "") for i, g in enumerate(groups)
    ]
    ids: list[int] = []
    for c in chunks:
        if c:
            ids.extend(_encode_plain(tok, c))
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mesa-vllm eval corpus",
        description="Build a plain-text corpus for real-text perplexity (ppl --text FILE).",
    )
    p.add_argument("name", choices=["pydoc"], help="pydoc: Debian's python3-doc HTML as text")
    p.add_argument("--out", help=f"output file (default: {default_path()})")
    p.add_argument("--html-dir", help="the HTML directory (default: found through dpkg)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``corpus pydoc [--out FILE]``: build the corpus, print its path; 2 on error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        path = build_pydoc_corpus(args.out, args.html_dir)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prov = provenance(path) or {}
    print(
        f"{path}: {prov.get('documents')} documents, {prov.get('characters')} characters "
        f"({prov.get('package')} {prov.get('version')}; provenance: {sidecar_path(path)})",
        file=sys.stderr,
    )
    print(path)
    return 0
