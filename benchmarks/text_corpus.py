"""A byte-level Megatron indexed dataset (.bin/.idx) of the running interpreter's standard library.

    python benchmarks/text_corpus.py --out /tmp/stdlib/stdlib [--max-bytes N] [--json corpus.json]

Text for ``pretrain_gpt.py`` that needs no download and that we did not write: the ``.py`` sources
under ``sysconfig.get_paths()["stdlib"]``, read as bytes, one document per file, in sorted order of
their paths relative to that folder (so the stream does not depend on where Python is installed).
Each byte is a token 0..255 and every document ends with :data:`EOD` = 256. Megatron's
``NullTokenizer`` takes its end-of-document id as ``vocab_size - 1`` (megatron-core 0.19.2,
``megatron/core/tokenizers/text/libraries/null_tokenizer.py``), so the run passes
``--tokenizer-type NullTokenizer --vocab-size 257`` (:data:`VOCAB_SIZE`); Megatron pads the
embedding to the next multiple of ``--make-vocab-size-divisible-by`` (128 by default) times TP, 384
rows at TP=1, and the 127 extra rows are never a target.

Left out, each for a reason:

* folders named ``test``, ``tests`` or ``idle_test``: 20.1 MB of the 31.7 MB of ``.py`` in CPython
  3.12.1's stdlib, much of it generated data tables and deliberately malformed sources, and Debian
  and Ubuntu ship them in a separate package (``libpython3.X-testsuite``), so keeping them would make
  the corpus depend on which packages a machine has; ``--include-tests`` keeps them;
* ``site-packages`` / ``dist-packages`` (third-party code installed into the interpreter, different
  on every machine) and ``config-*`` folders and ``_sysconfigdata_*.py`` (written when Python was
  built, holding that build's paths and compiler flags);
* empty files (many ``__init__.py``): a document of only EOD carries no text.

``--max-bytes N`` keeps the first N bytes of the stream: whole files in order, the last one cut at
the cap (it still ends with EOD). The summary (printed as one JSON line and written with ``--json``)
holds the Python version, the stdlib folder, files, documents, bytes, tokens (bytes + documents) and
the sha256 of the token stream as little-endian uint16, which is the sha256 of ``PREFIX.bin`` on a
little-endian machine: two machines built the same corpus when the hashes agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EOD = 256
VOCAB_SIZE = EOD + 1
TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
THIRD_PARTY_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# uint16 holds 0..65535 and halves the .bin of int32; the reader takes the dtype from the .idx.
DTYPE = numpy.uint16


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _skip_folder(name: str, include_tests: bool) -> bool:
    if name in THIRD_PARTY_FOLDERS or name.startswith("config-"):
        return True
    return not include_tests and name in TEST_FOLDERS


def source_files(root: Path, include_tests: bool = False) -> List[Path]:
    """``.py`` files under ``root`` that the corpus reads (see the module docstring), sorted by
    their POSIX path relative to ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; pass the standard library folder (--root) or omit --root.")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not _skip_folder(d, include_tests)]
        for name in files:
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                found.append(Path(folder, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(
    out_prefix: str,
    *,
    root: Optional[Path] = None,
    max_bytes: Optional[int] = None,
    include_tests: bool = False,
) -> Dict:
    """Write ``out_prefix.bin`` / ``out_prefix.idx`` (one sequence per document) and return the
    summary described in the module docstring."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"--max-bytes must be >= 1, got {max_bytes}; omit it to read every file.")
    start = time.perf_counter()
    root = stdlib_root() if root is None else Path(root)
    files = source_files(root, include_tests)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}: not a Python standard library folder.")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(out_prefix), dtype=DTYPE)
    digest = hashlib.sha256()
    n_bytes = n_docs = n_empty = n_read = 0
    for path in files:
        data = path.read_bytes()
        n_read += 1
        if max_bytes is not None:
            data = data[: max_bytes - n_bytes]
        if not data:
            n_empty += 1
        else:
            tokens = numpy.empty(len(data) + 1, dtype=DTYPE)
            tokens[:-1] = numpy.frombuffer(data, dtype=numpy.uint8)
            tokens[-1] = EOD
            builder.add_document(tokens, [tokens.size])
            digest.update(tokens.astype("<u2").tobytes())
            n_bytes += len(data)
            n_docs += 1
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    builder.finalize(get_idx_path(out_prefix))
    return {
        "prefix": os.path.abspath(out_prefix),
        "python": platform.python_version(),
        "stdlib": str(root),
        "include_tests": include_tests,
        "max_bytes": max_bytes,
        "files_read": n_read,
        "files_found": len(files),
        "empty_files_skipped": n_empty,
        "documents": n_docs,
        "bytes": n_bytes,
        "tokens": n_bytes + n_docs,
        "eod": EOD,
        "vocab_size": VOCAB_SIZE,
        "dtype": numpy.dtype(DTYPE).name,
        "sha256": digest.hexdigest(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--max-bytes", type=int, default=None, help="keep the first N bytes of the stream")
    p.add_argument("--include-tests", action="store_true", help="also read test/, tests/, idle_test/ folders")
    p.add_argument("--root", default=None, help="read this folder instead of the interpreter's stdlib (tests)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    summary = build_corpus(args.out, root=args.root, max_bytes=args.max_bytes, include_tests=args.include_tests)
    print(json.dumps(summary), flush=True)
    if args.json:
        from benchmarks.json_out import write_json

        write_json(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
