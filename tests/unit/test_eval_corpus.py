"""Real-text corpus: HTML -> prose, the pydoc build (sidecar, order, errors), token windows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mesa_vllm.eval import cli, corpus, harness

pytestmark = pytest.mark.unit

PAGE = """<!DOCTYPE html>
<html><head><title>json &#8212; docs</title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script></head>
<body>
<div class="related" role="navigation"><ul><li><a href="x.html">previous</a></li></ul></div>
<nav class="menu"><p>Table of Contents</p></nav>
<div class="body" role="main">
<h1>json &mdash; JSON encoder<a class="headerlink" href="#json">&para;</a></h1>
<p>JSON is a <em>lightweight</em>   data
interchange format; see <code class="literal"><span class="pre">json.dumps()</span></code>.</p>
<div class="highlight-python3"><div class="highlight"><pre>&gt;&gt;&gt; import json
</pre></div></div>
<pre>raw code block</pre>
<ul><li>First item</li><li>Second <b>item</b></li></ul>
<dl class="py function"><dt class="sig sig-object py" id="json.dump">json.dump(obj, fp)</dt>
<dd><p>Serialize <em>obj</em> as a JSON stream.<br>Second line.</p></dd></dl>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
<img src="x.png" alt="a picture"><p>After image &amp; entity.</p>
</div>
<div class="footer">&copy; Copyright 2001</div>
</body></html>
"""

WANT = [
    "json — JSON encoder",
    "JSON is a lightweight data interchange format; see json.dumps().",
    "First item",
    "Second item",
    "Serialize obj as a JSON stream.",
    "Second line.",
    "cell one",
    "cell two",
    "After image & entity.",
]


def test_html_to_text_keeps_prose_drops_code_and_navigation():
    assert corpus.html_to_text(PAGE).splitlines() == WANT


def test_html_to_text_without_a_main_region_and_with_stray_tags():
    page = "<p>One</p></span><div><p>Two <i>three</div><script>x</script><p>Four"
    assert corpus.html_to_text(page).splitlines() == ["One", "Two three", "Four"]
    assert corpus.html_to_text("<pre>only code</pre>") == ""


def _site(root: Path) -> Path:
    (root / "library").mkdir(parents=True)
    (root / "_static").mkdir()
    (root / "index.html").write_text("<main><p>Welcome page.</p></main>")
    (root / "library" / "json.html").write_text(PAGE)
    (root / "library" / "a.html").write_text("<p>Alpha page.</p><p>More alpha.</p>")
    (root / "genindex-A.html").write_text("<p>index entries</p>")
    (root / "search.html").write_text("<p>search</p>")
    (root / "_static" / "x.html").write_text("<p>static</p>")
    (root / "empty.html").write_text("<pre>code only</pre>")
    return root


def test_build_corpus_from_a_site(tmp_path):
    root = _site(tmp_path / "html")
    out = corpus.build_pydoc_corpus(tmp_path / "c" / "pydoc.txt", html_dir=root)
    text = corpus.load_corpus(out)
    docs = text.rstrip("\n").split("\n\n")
    # sorted relative paths: index.html, library/a.html, library/json.html; others left out
    assert docs == ["Welcome page.", "Alpha page.\nMore alpha.", "\n".join(WANT)]
    prov = corpus.provenance(out)
    assert corpus.sidecar_path(out) == tmp_path / "c" / "pydoc.txt.json"
    assert prov["package"] == "python3-doc" and prov["documents"] == 3
    assert prov["characters"] == len(text)
    assert prov["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    again = corpus.build_pydoc_corpus(tmp_path / "d.txt", html_dir=root)
    assert again.read_bytes() == out.read_bytes()


def test_missing_html_names_the_package(tmp_path):
    with pytest.raises(corpus.CorpusError, match="apt-get install -y python3-doc"):
        corpus.build_pydoc_corpus(tmp_path / "x.txt", html_dir=tmp_path / "nothing")


def test_corpus_cli(tmp_path, capsys):
    root = _site(tmp_path / "html")
    out = tmp_path / "o.txt"
    assert cli.main(["corpus", "pydoc", "--html-dir", str(root), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((tmp_path / "o.txt.json").read_text())["documents"] == 3
    assert cli.main(["corpus", "pydoc", "--html-dir", str(tmp_path / "no")]) == 2
    assert "apt-get install" in capsys.readouterr().err


def test_real_pydoc_has_over_a_million_characters():
    try:
        root = corpus.find_pydoc_html()
    except corpus.CorpusError:
        pytest.skip("python3-doc is not installed")
    total = 0
    for doc in corpus.documents(root):  # stop early: the whole build takes ~15 s
        assert "\n\n" not in doc and "¶" not in doc
        total += len(doc)
        if total > 1_000_000:
            break
    assert total > 1_000_000


IDS = list(range(1000, 1600))  # a 600-token "corpus"


def test_windows_exact_deterministic_distinct():
    jobs = harness.text_windows(IDS, [50, 100], samples=5, seed=3, prefix=[1])
    assert jobs == harness.text_windows(IDS, [50, 100], samples=5, seed=3, prefix=[1])
    assert jobs != harness.text_windows(IDS, [50, 100], samples=5, seed=4, prefix=[1])
    for n in (50, 100):
        ws = [j for j in jobs if j.length == n]
        assert [j.index for j in ws] == list(range(5))
        assert len({j.offset for j in ws}) == 5
        for j in ws:
            assert len(j.prompt) == n == j.n_tokens and j.prompt[0] == 1 and j.key is None
            assert list(j.prompt[1:]) == IDS[j.offset : j.offset + n - 1]
    # a length's windows do not depend on the other lengths asked for
    alone = harness.text_windows(IDS, [100], samples=5, seed=3, prefix=[1])
    assert alone == [j for j in jobs if j.length == 100]
    assert all(len(j.prompt) == 600 for j in harness.text_windows(IDS, [600], 1, 0))


def test_shared_end_windows_score_the_same_tail():
    lengths = [50, 200, 100]
    jobs = harness.text_windows(IDS, lengths, samples=6, seed=3, prefix=[1], shared_end=True)
    assert jobs == harness.text_windows(IDS, lengths, 6, 3, [1], shared_end=True)
    assert [j.length for j in jobs] == [n for n in lengths for _ in range(6)]
    ends = {}
    for j in jobs:
        assert len(j.prompt) == j.length == j.n_tokens and j.prompt[0] == 1
        assert list(j.prompt[1:]) == IDS[j.offset : j.offset + j.length - 1]
        ends.setdefault(j.index, set()).add(j.offset + j.length - 1)
    # sample i ends at one corpus token at every length; the samples' ends are distinct
    assert all(len(e) == 1 for e in ends.values()) and len({*map(min, ends.values())}) == 6
    tails = {(j.index, tuple(j.prompt[-40:])) for j in jobs}
    assert len(tails) == 6
    # without shared ends the lengths' windows are drawn apart
    apart = harness.text_windows(IDS, lengths, samples=6, seed=3, prefix=[1])
    assert len({(j.index, j.offset + j.length) for j in apart}) > 6


def test_windows_too_short_corpus():
    with pytest.raises(ValueError, match="fewer than the longest window"):
        harness.text_windows(IDS, [64, 700], samples=1, seed=0)
    with pytest.raises(ValueError, match="distinct windows"):
        harness.text_windows(IDS, [599], samples=3, seed=0)


def test_tokenize_and_windows_with_the_project_tokenizer():
    from transformers import AutoTokenizer

    from mesa_vllm.testing.tokenizer import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    docs = [f"Document {i} says the grass is green and the sky is blue." for i in range(40)]
    text = "\n\n".join(docs)
    ids = corpus.tokenize(tok, text, chunk_chars=200)  # several chunks
    assert tok.decode(ids) == text and tok.bos_token_id not in ids
    prefix = corpus.bos_prefix(tok)
    assert prefix == [tok.bos_token_id]
    jobs = harness.make_jobs("ppl", tok, [64, 128], 3, seed=0, text_ids=ids, text_prefix=prefix)
    assert [len(j.prompt) for j in jobs] == [64] * 3 + [128] * 3
