#!/usr/bin/env bash
# usage: bash benchmarks/cached_path_ab.sh REV [ROUNDS]
# The cached selector path of git revision REV ("before") against the working tree ("after"), on this machine,
# alternating ROUNDS times (default 2) so that drift in the machine's speed hits both sides alike:
# benchmarks/selector_speed.py's cached-bf16 variant (training steps, scoring, cache build) and
# benchmarks/trunk_layouts.py (the trunk pass alone, three layouts of the two orders).
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1; rounds=${2:-2}
old=$(mktemp -d); trap 'git worktree remove --force "$old"' EXIT
git worktree add -q --detach "$old" "$rev"
lscpu | grep -E "Model name"; lscpu | grep -o -E "amx_bf16|avx512_bf16" | sort -u | tr '\n' ' '; echo
for r in $(seq "$rounds"); do
  for side in before after; do
    src=$PWD/src; [ $side = before ] && src=$old/src
    echo "== round $r, $side"
    PYTHONPATH=$src .venv/bin/python benchmarks/selector_speed.py --variants cached-bf16 --steps 30 \
      --train-pairs 240 --score-pairs 128 | grep -E "^\| cached"
  done
done
.venv/bin/python benchmarks/trunk_layouts.py --rev "$rev"
