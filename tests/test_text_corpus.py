"""benchmarks/text_corpus.py read back with megatron-core's own IndexedDataset: which files become
documents and in what order, each document's tokens (bytes then one EOD, nothing else), the byte cap,
and that two builds of the interpreter's stdlib give the same sha256."""

from __future__ import annotations

import hashlib
import json

import numpy
import pytest

indexed_dataset = pytest.importorskip("megatron.core.datasets.indexed_dataset")

from benchmarks import text_corpus  # noqa: E402

EOD = text_corpus.EOD


def _read(prefix):
    return indexed_dataset.IndexedDataset(str(prefix))


def _docs(ds):
    # one sequence per document: every document boundary is a sequence boundary
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))
    # copies: ds[i] views the .bin's mmap, which closes (and segfaults a later read) when ds is freed
    return [numpy.array(ds[i]) for i in range(len(ds))]


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    files = {
        "zeta.py": b"z = 26\n",
        "abc.py": b"import os\n",
        "Upper.py": b"U\n",
        "pkg/__init__.py": b"",
        "pkg/raw.py": bytes([0, 255, 128, 10]),  # not UTF-8: read as bytes, never decoded
        "pkg/test/t.py": b"assert 1\n",
        "unittest/tests/u.py": b"assert 2\n",
        "idlelib/idle_test/v.py": b"assert 3\n",
        "site-packages/third.py": b"third party\n",
        "config-3.12-x86_64-linux-gnu/python-config.py": b"build\n",
        "_sysconfigdata__linux_x86_64-linux-gnu.py": b"build_time_vars = {}\n",
        "notes.txt": b"not python\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root, files


def test_documents_order_and_tokens(tmp_path, fake_stdlib):
    root, files = fake_stdlib
    s = text_corpus.build_corpus(str(tmp_path / "c"), root=root)
    # sorted by relative POSIX path (ASCII: 'U' < '_' < 'a'); pkg/__init__.py is empty and skipped
    kept = ["Upper.py", "abc.py", "pkg/raw.py", "zeta.py"]
    docs = _docs(_read(tmp_path / "c"))
    assert [d.tolist() for d in docs] == [list(files[k]) + [EOD] for k in kept]
    assert all(d.dtype == numpy.uint16 for d in docs)
    n_bytes = sum(len(files[k]) for k in kept)
    assert (s["documents"], s["bytes"], s["tokens"]) == (4, n_bytes, n_bytes + 4)
    assert (s["files_found"], s["files_read"], s["empty_files_skipped"]) == (5, 5, 1)
    stream = numpy.concatenate(docs).astype("<u2").tobytes()
    assert s["sha256"] == hashlib.sha256(stream).hexdigest()
    assert s["sha256"] == hashlib.sha256((tmp_path / "c.bin").read_bytes()).hexdigest()


def test_include_tests_adds_the_test_folders(tmp_path, fake_stdlib):
    root, _ = fake_stdlib
    rel = [p.relative_to(root).as_posix() for p in text_corpus.source_files(root, include_tests=True)]
    assert rel == ["Upper.py", "abc.py", "idlelib/idle_test/v.py", "pkg/__init__.py", "pkg/raw.py",
                   "pkg/test/t.py", "unittest/tests/u.py", "zeta.py"]


def test_max_bytes_cuts_the_last_file(tmp_path, fake_stdlib):
    root, files = fake_stdlib
    cap = len(files["Upper.py"]) + 4  # all of Upper.py, the first 4 bytes of abc.py
    s = text_corpus.build_corpus(str(tmp_path / "c"), root=root, max_bytes=cap)
    docs = _docs(_read(tmp_path / "c"))
    assert [d.tolist() for d in docs] == [list(files["Upper.py"]) + [EOD], list(files["abc.py"][:4]) + [EOD]]
    assert (s["bytes"], s["tokens"], s["documents"], s["files_read"]) == (cap, cap + 2, 2, 2)


def test_bad_input_is_refused_before_writing(tmp_path, fake_stdlib):
    root, _ = fake_stdlib
    with pytest.raises(ValueError, match="max-bytes"):
        text_corpus.build_corpus(str(tmp_path / "c"), root=root, max_bytes=0)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        text_corpus.build_corpus(str(tmp_path / "c"), root=root / "abc.py")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .py files"):
        text_corpus.build_corpus(str(tmp_path / "c"), root=tmp_path / "empty")
    assert not (tmp_path / "c.bin").exists()


def test_stdlib_corpus_reads_back_and_is_deterministic(tmp_path):
    cap = 60_000
    a = text_corpus.main(["--out", str(tmp_path / "a" / "s"), "--max-bytes", str(cap),
                          "--json", str(tmp_path / "a.json")])
    b = text_corpus.build_corpus(str(tmp_path / "b" / "s"), max_bytes=cap)
    assert a["sha256"] == b["sha256"] and a["tokens"] == b["tokens"]
    assert json.loads((tmp_path / "a.json").read_text())["sha256"] == a["sha256"]
    assert text_corpus.build_corpus(str(tmp_path / "c" / "s"), max_bytes=cap - 1)["sha256"] != a["sha256"]

    docs = _docs(_read(tmp_path / "a" / "s"))
    assert a["bytes"] == cap and len(docs) == a["documents"] >= 2
    stream = numpy.concatenate(docs)
    assert stream.size == a["tokens"] and 0 <= int(stream.min()) and int(stream.max()) == EOD
    # EOD exactly at the end of every document, nowhere else
    assert numpy.flatnonzero(stream == EOD).tolist() == (numpy.cumsum([d.size for d in docs]) - 1).tolist()
    # every document is its file's bytes, in order (the last one cut at the cap)
    files = [p for p in text_corpus.source_files(text_corpus.stdlib_root()) if p.stat().st_size > 0]
    for doc, path in zip(docs[:-1], files):
        assert doc[:-1].tobytes() == numpy.frombuffer(path.read_bytes(), numpy.uint8).astype(numpy.uint16).tobytes()
    last = files[len(docs) - 1].read_bytes()
    assert docs[-1][:-1].tolist() == list(last[: docs[-1].size - 1]) and docs[-1].size - 1 <= len(last)
