"""tools/manpages_corpus.py: roff to plain text, chunking and selection, on an embedded page (no downloads)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from megatron_sgtm.errors import UserError
from tests.support import ROOT

spec = importlib.util.spec_from_file_location("manpages_corpus", ROOT / "tools" / "manpages_corpus.py")
manpages = importlib.util.module_from_spec(spec)
sys.modules["manpages_corpus"] = manpages
spec.loader.exec_module(manpages)

PAGE = r""".\" Copyright and licence: a comment that must not appear
.TH LS 1 "Septiembre de 2022" "GNU coreutils 9.1" "Órdenes de usuario"
.de XX
.  ft B
..
.SH NOMBRE
ls \- lista el contenido de un directorio
.SH SINOPSIS
\fBls\fP [\fI\,OPCIÓN\/\fP]... \" trailing comment
.SH DESCRIPCIÓN
.PP
Por defecto, muestra los archivos\(emordenados \(lqalfabéticamente\(rq.
.TP
\fB\-a\fP, \fB\-\-all\fP
no oculta las entradas que comienzan con \e.
.BR chmod (1),
.IP "\(bu" 4
\s-1SIZE\s0 en \f(CWbytes\fR\&.
.TS
tab(;);
l l.
cell;cell
.TE
.in +4n
.EX
ls \-l | sort
.EE
"""


def test_roff_to_text_keeps_the_text_and_drops_markup():
    text = manpages.roff_to_text(PAGE)
    assert text.split("\n\n") == [
        "NOMBRE ls - lista el contenido de un directorio",
        "SINOPSIS ls [OPCIÓN]...",
        "DESCRIPCIÓN",
        'Por defecto, muestra los archivos—ordenados "alfabéticamente". -a, --all no oculta las entradas que '
        "comienzan con \\. chmod(1), • SIZE en bytes. ls -l | sort",
    ]
    for markup in ("\\f", "comment", "ft B", "cell", "tab(", "Copyright", "Septiembre"):
        assert markup not in text


def test_macro_args_group_quotes():
    assert manpages.macro_args('"a b" c "say ""hi"""') == ["a b", "c", 'say "hi"']


def test_chunks_split_at_paragraphs_within_the_bound():
    text = "\n\n".join(["alpha " * 10, "beta " * 10, "gamma. " * 40])
    pieces = manpages.chunks(text, 100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert manpages.chunks("short", 100) == ["short"]


def test_select_dedupes_caps_and_is_deterministic():
    docs = [{"id": f"{c}/{i}", "text": f"{c} {i % 5}", "category": c} for c in ("english", "spanish")
            for i in range(10)] + [{"id": "italian/0", "text": "it", "category": "italian"}]
    picked = manpages.select(docs, max_docs=3, balance=False, seed=0)
    assert len({d["text"] for d in picked}) == len(picked) == 7
    assert picked == manpages.select(docs, max_docs=3, balance=False, seed=0)
    assert [d["id"] for d in picked] != [d["id"] for d in manpages.select(docs, 3, False, seed=1)]
    balanced = manpages.select(docs[:12], max_docs=None, balance=True, seed=0)  # 5 english texts, 2 spanish
    assert sorted(d["category"] for d in balanced) == ["english"] * 2 + ["spanish"] * 2


def test_missing_tool_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(manpages.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get not found"):
        manpages._run(["apt-get", "download", "manpages-es"])


def test_untranslated_drops_english_paragraphs_of_translations_only():
    spanish = "Muestra los archivos del directorio que se indica, con el tamaño de cada uno."
    english = "When job control is not enabled, the shell receives the signals that are sent to the process group."
    code = "int syscall(SYS_arch_prctl, int code, unsigned long addr);"
    assert manpages.untranslated(english, "spanish")
    assert manpages.untranslated(english, "italian")
    assert not manpages.untranslated(spanish, "spanish")
    assert not manpages.untranslated(code, "spanish")  # no language's function words: kept
    assert not manpages.untranslated("Esta opción is the default.", "spanish")  # too few words to judge
    mixed = f"{spanish} {english[:40]}"
    assert not manpages.untranslated(mixed, "spanish")


def test_documents_drop_the_translations_english_paragraphs(tmp_path):
    import gzip

    spanish = "Muestra los archivos del directorio que se indica, con el tamaño de cada uno de ellos."
    english = "When job control is not enabled, the shell receives the signals that are sent to the group."
    page = f".SH DESCRIPCIÓN\n{spanish}\n.PP\n{english}\n"
    roots = {}
    for package, man_dir in (("manpages-es", "usr/share/man/es"), ("manpages", "usr/share/man")):
        (tmp_path / package / man_dir / "man1").mkdir(parents=True)
        (tmp_path / package / man_dir / "man1" / "x.1.gz").write_bytes(gzip.compress(page.encode()))
        roots[package] = tmp_path / package
    texts = {d["category"]: d["text"] for d in manpages.documents(roots, 4000, 10)}
    assert spanish in texts["spanish"] and english not in texts["spanish"]
    assert english in texts["english"]  # the English pages are not judged
    kept = {d["category"]: d["text"] for d in manpages.documents(roots, 4000, 10, keep_untranslated=True)}
    assert english in kept["spanish"]
    # A long paragraph, mostly Spanish with an English passage, cut into pieces: the English piece goes too.
    (tmp_path / "manpages-es/usr/share/man/es/man1/x.1.gz").write_bytes(gzip.compress(
        f".PP\n{spanish} {spanish} {spanish} {english}\n".encode()))
    pieces = [d["text"] for d in manpages.documents({"manpages-es": roots["manpages-es"]}, len(spanish) + 1, 10)]
    assert pieces == [spanish] * 3
