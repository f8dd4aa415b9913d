#!/usr/bin/env bash
# Merge the working corpus (corpus/TARGET) and the committed one
# (corpora/TARGET) into a small set covering the same edges (set cover,
# hit counts ignored, inputs cut at MAX_LEN bytes), ready to commit. The
# committed corpora stay within 600 files and 1 MiB per target
# (tests/corpus_bounds.rs checks).
#
#   fuzz/minimize.sh TARGET [MAX_LEN]
set -euo pipefail
cd "$(dirname "$0")"
target=$1 max=${2:-4096}
out=$(mktemp -d)
mkdir -p "corpora/$target" "corpus/$target"
nice -n 19 cargo +nightly fuzz run --features libfuzzer "$target" "$out" \
  "corpora/$target" "corpus/$target" -- \
  -set_cover_merge=1 -use_counters=0 -max_len="$max" -timeout=20 -rss_limit_mb=2048 \
  2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" || true
rm -rf "corpora/$target"
mv "$out" "corpora/$target"
chmod 755 "corpora/$target"
echo "corpora/$target: $(find "corpora/$target" -type f | wc -l) files, $(du -sb "corpora/$target" | cut -f1) bytes"
