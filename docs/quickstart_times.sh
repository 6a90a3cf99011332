#!/usr/bin/env bash
# Runs README.md's quick-start block line by line in this folder, timing each command.
set -e
start=$(date +%s)
sed -n '/<!-- quickstart:begin -->/,/<!-- quickstart:end -->/p' README.md | grep -v '^<!--\|^```' |
while IFS= read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  echo "=== $line"
  t0=$(date +%s.%N)
  if [[ "$line" == source* ]]; then continue; fi
  PATH="$PWD/.venv/bin:$PATH" bash -c "$line" > last.out 2> last.err || { echo "FAILED"; tail -5 last.err; exit 1; }
  t1=$(date +%s.%N)
  echo "    $(echo "$t1 - $t0" | bc) s; last line: $(tail -1 last.out | cut -c1-300)"
done
echo "total $(( $(date +%s) - start )) s"
