#!/usr/bin/env bash
# Checks that imports between src/'s folders run one way only (DESIGN.md §7, lib.rs "Layout"):
# a module may use a module of a lower layer or a leaf, never one of its own layer or above.
# Reads the `crate::` paths of the non-test code (a file's inline `#[cfg(test)] mod tests {`
# block, which ends the file by convention, and the tests.rs files are fixtures, left out). Prints each offending import; exit 1 if any.
#
#   tests/layering.sh          run by tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# layer of each top-level module (higher uses lower); leaves: any layer may use them.
declare -A layer=(
  [config]=0 [identity]=1 [tls]=2 [policy]=3 [discovery]=4 [proxy]=5
  [inbound]=6 [outbound]=6 [gateway]=7 [admin]=8 [dev_ca]=8 [k8s]=8 [app]=9 [demo]=10
)
declare -A leaf=([telemetry]=1 [pb]=1)

module_of() { # src/x/y.rs -> x ; src/x.rs -> x
  local rel=${1#src/}
  rel=${rel%%/*}
  echo "${rel%.rs}"
}

bad=0
while IFS= read -r file; do
  case $file in */tests.rs | */tests/*) continue ;; esac
  from=$(module_of "$file")
  [ "$from" = lib ] || [ "$from" = main ] && continue
  # the code before the file's test module
  while IFS= read -r hit; do
    line=${hit%%:*}
    to=${hit#*:}
    to=${to#crate::}
    [ "$to" = "$from" ] && continue
    [ -n "${leaf[$to]:-}" ] && continue
    if [ -n "${leaf[$from]:-}" ]; then
      echo "$file:$line: $from is a leaf but uses crate::$to"
      bad=1
      continue
    fi
    if [ -z "${layer[$from]:-}" ] || [ -z "${layer[$to]:-}" ]; then
      echo "$file:$line: crate::$to from $from: a module tests/layering.sh does not place in a layer"
      bad=1
      continue
    fi
    if [ "${layer[$to]}" -ge "${layer[$from]}" ]; then
      echo "$file:$line: $from (layer ${layer[$from]}) uses crate::$to (layer ${layer[$to]}): imports must run down the layers"
      bad=1
    fi
  done < <(awk '/^#\[cfg\(test\)\]/ { t = 1; next } t && /^(pub )?mod tests *\{/ { exit } { t = 0; print NR ":" $0 }' "$file" |
    grep -oE '^[0-9]+:|crate::[a-z_0-9]+' | awk '/^[0-9]+:$/ { n = $0; next } { print n $0 }')
done < <(find src -name '*.rs' | sort)

# `use crate::{a, b}` hides which modules it names from the check above.
if grouped=$(grep -rn 'crate::{' src --include='*.rs'); then
  echo "$grouped" | sed 's/$/: name one module per use (crate::x::{...}) so tests\/layering.sh can read it/'
  bad=1
fi

if [ "$bad" = 0 ]; then
  echo "tests/layering.sh: imports run one way (config -> identity -> tls -> policy -> discovery -> proxy -> inbound/outbound -> gateway -> admin -> app)"
fi
exit "$bad"
