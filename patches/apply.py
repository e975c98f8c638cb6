#!/usr/bin/env python3
"""Apply, check or revert the megatron_dsv patches on a Megatron-LM checkout.

    python patches/apply.py apply  --megatron PATH
    python patches/apply.py check  --megatron PATH
    python patches/apply.py revert --megatron PATH

PATH is a Megatron-LM clone, or any folder holding ``megatron/core`` and ``megatron/training``
(for example a copy of the installed megatron-core package). ``manifest.json`` names the pinned
Megatron-LM commit, the patch series (applied in order) and, for every file the series touches,
the git blob SHA-1 of the file at that commit (``upstream``) and after the whole series
(``patched``); a file in any other state is refused before anything is written.

* ``apply``: patches every file that is ``upstream``; a file already ``patched`` is left alone, so
  applying twice is a no-op. Each file is patched in a scratch copy with GNU ``patch`` (no fuzz),
  checked against its ``patched`` hash, and only then written over the original.
* ``check``: exit 0 when every file is ``patched``; 1 when some are not applied (``upstream``);
  2 when a file matches neither (another commit, or local edits).
* ``revert``: reverse-applies the series to every ``patched`` file and checks the result is the
  ``upstream`` file byte for byte before writing it.
* ``rehash`` (for maintainers, after editing a patch): applies the series to an ``upstream``
  checkout in scratch copies and rewrites the ``patched`` hashes in ``manifest.json``.

Needs GNU patch (``apt-get install patch``); uses nothing else outside the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"

UPSTREAM, PATCHED, OTHER, MISSING = "upstream", "patched", "other", "missing"


class PatchError(RuntimeError):
    """A checkout the patches cannot be applied to or reverted from; the message says why."""


def blob_sha1(path: Path) -> str:
    """Git's blob hash of a file (``git hash-object``), so it compares with ``git ls-tree``."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_manifest() -> dict:
    with open(MANIFEST) as f:
        return json.load(f)


def patch_target(patch_file: Path) -> str:
    """The single file a patch changes (its ``+++ b/...`` line)."""
    targets = re.findall(r"^\+\+\+ b/(\S+)", patch_file.read_text(), flags=re.M)
    if len(set(targets)) != 1:
        raise PatchError(f"{patch_file.name}: expected one target file, found {targets}")
    return targets[0]


def series_by_file(manifest: dict) -> Dict[str, List[Path]]:
    by_file: Dict[str, List[Path]] = {}
    for name in manifest["patches"]:
        p = HERE / name
        by_file.setdefault(patch_target(p), []).append(p)
    return by_file


def expected_commit(manifest: dict) -> str:
    m = manifest["megatron_lm"]
    return f"{m['repository']} commit {m['commit']} (branch {m['branch']}, megatron-core {m['megatron_core']})"


def file_states(root: Path, manifest: dict) -> Dict[str, str]:
    states = {}
    for rel, hashes in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            states[rel] = MISSING
            continue
        digest = blob_sha1(path)
        states[rel] = UPSTREAM if digest == hashes["upstream"] else PATCHED if digest == hashes["patched"] else OTHER
    return states


def check_root(root: Path) -> None:
    if not (root / "megatron" / "core").is_dir() or not (root / "megatron" / "training").is_dir():
        raise PatchError(
            f"{root} does not hold megatron/core and megatron/training; pass --megatron the root "
            "of a Megatron-LM clone (the folder that contains megatron/)."
        )


def refuse_mismatch(states: Dict[str, str], manifest: dict) -> None:
    bad = {rel: s for rel, s in states.items() if s in (OTHER, MISSING)}
    if bad:
        lines = "\n".join(f"  {rel}: {'missing' if s == MISSING else 'matches neither the pinned nor the patched file'}"
                          for rel, s in bad.items())
        raise PatchError(
            f"refusing: these files are not the ones the patches target:\n{lines}\n"
            f"The patches expect {expected_commit(manifest)}. Check out that commit "
            "(git checkout <commit> -- megatron/training) or use the matching megatron_dsv release."
        )


def gnu_patch() -> str:
    exe = shutil.which("patch")
    if exe is None:
        raise PatchError("GNU patch is not installed (Debian/Ubuntu: apt-get install patch).")
    return exe


def run_series(src: Path, patches: List[Path], reverse: bool) -> bytes:
    """The bytes of ``src`` after applying (or reverse-applying, last first) ``patches``."""
    exe = gnu_patch()
    with tempfile.TemporaryDirectory(prefix="dsv-patch-") as tmp:
        work = Path(tmp) / src.name
        shutil.copyfile(src, work)
        for p in reversed(patches) if reverse else patches:
            cmd = [exe, "--batch", "--fuzz=0", "--no-backup-if-mismatch", "--reject-file=-", "--quiet"]
            if reverse:
                cmd.append("--reverse")
            cmd += [str(work), str(p)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise PatchError(f"{p.name} does not {'revert' if reverse else 'apply'} to {src}:\n{r.stdout}{r.stderr}")
        return work.read_bytes()


def diffstat(patches: List[Path]) -> str:
    added = removed = 0
    for p in patches:
        for line in p.read_text().splitlines():
            if line.startswith("+") and not line.startswith("+++"):
                added += 1
            elif line.startswith("-") and not line.startswith("---"):
                removed += 1
    return f"+{added} -{removed}"


def write_bytes_like(path: Path, data: bytes) -> None:
    """Replace ``path``'s content, keeping its mode."""
    mode = path.stat().st_mode
    tmp = path.with_name(path.name + ".dsv-tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def transform(root: Path, reverse: bool, out=print) -> int:
    """apply (reverse=False) or revert (reverse=True); returns the number of files written."""
    manifest = load_manifest()
    check_root(root)
    states = file_states(root, manifest)
    refuse_mismatch(states, manifest)
    by_file = series_by_file(manifest)
    source_state, target_state = (PATCHED, UPSTREAM) if reverse else (UPSTREAM, PATCHED)
    verb = "reverted" if reverse else "patched"
    todo = [rel for rel, s in states.items() if s == source_state]
    if not todo:
        out(f"nothing to do: the patches are {'not applied' if reverse else 'already applied'} in {root}")
        return 0
    results = {}
    for rel in todo:  # all in scratch first: nothing is written unless every file succeeds
        data = run_series(root / rel, by_file[rel], reverse)
        digest = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if digest != manifest["files"][rel][target_state]:
            raise PatchError(f"{rel}: the {verb} file does not match manifest.json (hash {digest}).")
        results[rel] = data
    for rel, data in results.items():
        write_bytes_like(root / rel, data)
        names = ", ".join(p.name for p in by_file[rel])
        out(f"{verb} {rel} ({diffstat(by_file[rel])} lines; {names})")
    for rel in sorted(set(states) - set(todo)):
        out(f"unchanged {rel} (already {target_state})")
    return len(results)


def check(root: Path, out=print) -> int:
    manifest = load_manifest()
    check_root(root)
    states = file_states(root, manifest)
    for rel, s in states.items():
        out(f"{s:9s} {rel}")
    if any(s in (OTHER, MISSING) for s in states.values()):
        try:
            refuse_mismatch(states, manifest)
        except PatchError as e:
            out(str(e))
        return 2
    if all(s == PATCHED for s in states.values()):
        out(f"ok: the megatron_dsv patches are applied (pinned to {expected_commit(manifest)})")
        return 0
    out("not applied: run `python patches/apply.py apply --megatron PATH`")
    return 1


def rehash(root: Path, out=print) -> None:
    manifest = load_manifest()
    check_root(root)
    states = file_states(root, manifest)
    if any(s != UPSTREAM for s in states.values()):
        raise PatchError(f"rehash needs an unpatched checkout of {expected_commit(manifest)}; states: {states}")
    for rel, patches in series_by_file(manifest).items():
        data = run_series(root / rel, patches, reverse=False)
        manifest["files"][rel]["patched"] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    with open(MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    out(f"recorded patched hashes in {MANIFEST}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("apply", "check", "revert", "rehash"))
    parser.add_argument("--megatron", required=True, type=Path,
                        help="Megatron-LM checkout (the folder holding megatron/core and megatron/training)")
    args = parser.parse_args(argv)
    root = args.megatron.resolve()
    try:
        if args.command == "check":
            return check(root)
        if args.command == "rehash":
            rehash(root)
            return 0
        transform(root, reverse=args.command == "revert")
        return 0
    except PatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
