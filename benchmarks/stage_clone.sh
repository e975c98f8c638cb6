#!/usr/bin/env bash
# Stage the subset of Megatron-LM that pretrain_gpt.py needs, patched with our patches, into an
# ignored folder of this checkout, so one device call can carry it (run() carry=[".stage_clone"]).
#
#   bash benchmarks/stage_clone.sh [DEST]          # DEST defaults to .stage_clone
#
# Copies megatron/, pretrain_gpt.py, gpt_builders.py and model_provider.py at the commit pinned in
# patches/manifest.json from a bare mirror of NVIDIA/Megatron-LM (MLM_MIRROR, default
# /work/.mirror/NVIDIA+Megatron-LM/repo) into DEST/mlm, applies patches/apply.py, checks it, and
# prints the size. Idempotent: a DEST/mlm already patched at the pinned commit is only re-checked.
# DEST holds a .gitignore of "*", so git ignores it (no edit of .git/info/exclude needed; the lead
# may add /.stage_clone/ there too). The dataset helpers (C++) are compiled on the device
# (benchmarks/run_gpu_causal_gpt.sh runs make), not here: the .so must match the device's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.stage_clone}
MIRROR=${MLM_MIRROR:-/work/.mirror/NVIDIA+Megatron-LM/repo}
COMMIT=$(python3 -c 'import json; print(json.load(open("patches/manifest.json"))["megatron_lm"]["commit"])')
FILES=(megatron pretrain_gpt.py gpt_builders.py model_provider.py)
# The carry limit of a device call is 64 MiB for the clone and the working tree together; the clone
# subset is about 10 MB, so 40 MiB leaves room and still catches a wrong copy (a whole repository).
LIMIT_KB=$((40 * 1024))

mkdir -p "$DEST"
printf '*\n' > "$DEST/.gitignore"
STAMP="$DEST/mlm/.megatron_lm_commit"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$COMMIT" ] && python3 patches/apply.py check --megatron "$DEST/mlm" > /dev/null; then
  echo "already staged: $DEST/mlm is Megatron-LM $COMMIT with the patches applied"
else
  if ! git --git-dir="$MIRROR" cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
    echo "error: $MIRROR has no commit $COMMIT; point MLM_MIRROR at a clone of NVIDIA/Megatron-LM that has it" >&2
    exit 2
  fi
  rm -rf "$DEST/mlm"
  mkdir -p "$DEST/mlm"
  git --git-dir="$MIRROR" archive "$COMMIT" "${FILES[@]}" | tar -x -C "$DEST/mlm"
  echo "$COMMIT" > "$STAMP"
  echo "copied ${FILES[*]} of Megatron-LM $COMMIT into $DEST/mlm"
  python3 patches/apply.py apply --megatron "$DEST/mlm"
fi
python3 patches/apply.py check --megatron "$DEST/mlm"
for f in "${FILES[@]}"; do
  [ -e "$DEST/mlm/$f" ] || { echo "error: $DEST/mlm/$f is missing" >&2; exit 2; }
done
KB=$(du -sk "$DEST" | cut -f1)
TREE_KB=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "size: $DEST ${KB} KiB, tracked files ${TREE_KB} KiB (carry limit 65536 KiB in all)"
if [ "$KB" -gt "$LIMIT_KB" ]; then
  echo "error: $DEST is ${KB} KiB, more than ${LIMIT_KB} KiB; it should hold only ${FILES[*]}" >&2
  exit 2
fi
