#!/usr/bin/env bash
# Prints the first Python >= 3.12 that actually runs (pyenv shims may exist but fail), or nothing.
for c in python3.12 python3.13 python3 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
  p=$(command -v "$c" 2>/dev/null) || continue
  "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null && { echo "$p"; exit 0; }
done
exit 0
