#!/usr/bin/env bash
# CI (make test): install s2d_ext the way a new user does, on what a fresh machine has.
#
#   - a brand-new venv without system site-packages, never activated;
#   - PATH reset to the system's (/usr/local/bin:/usr/bin:/bin), so no cmake or ninja of ours leaks in,
#     and an empty HOME (no pip cache, no ~/.local);
#   - a plain isolated `pip install <checkout>` must fail within 90 s and name the working command;
#   - then the README's "Install" block, run as written (its venv path and checkout path substituted);
#   - then, from outside the checkout: the README's "Use" snippet (speculate() == generate() on a small random
#     Llama), `s2d --help`, and `s2d bench --help` (the harness ships in the wheel);
#   - then the same install from a git URL (git+file:// of this checkout's HEAD).
#
# Usage: tools/fresh_install_check.sh [--keep]   (--keep leaves the scratch folder for inspection)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/s2d_fresh.XXXXXX)
if [ "${1:-}" != "--keep" ]; then trap 'rm -rf "$work"' EXIT; fi
export PATH=/usr/local/bin:/usr/bin:/bin
export HOME="$work/home"
mkdir -p "$HOME"
unset PYTHONPATH VIRTUAL_ENV CMAKE_PREFIX_PATH
python=$(command -v python3.11 || command -v python3)
step() { echo "== fresh install: $* ($(date +%T))"; }
fail() { echo "FAIL (fresh install): $*" >&2; exit 1; }

step "new venv from $python (no system site-packages)"
"$python" -m venv "$work/s2d-env"
py="$work/s2d-env/bin/python"
if "$py" -c "import torch" 2>/dev/null; then fail "the new venv already sees a torch"; fi

step "plain isolated pip install must stop at once with the working command"
start=$SECONDS
if "$py" -m pip install --no-cache-dir "$root" >"$work/isolated.log" 2>&1; then
  fail "an isolated 'pip install .' succeeded; it must not build against a torch of its own"
fi
elapsed=$((SECONDS - start))
grep -q -- "--no-build-isolation" "$work/isolated.log" || { cat "$work/isolated.log"; fail "no working command named"; }
if grep -qi "caffe2\|torch-2\.1[4-9]" "$work/isolated.log"; then fail "the isolated build fetched a torch"; fi
[ "$elapsed" -le 90 ] || fail "the isolated install took ${elapsed} s to fail (limit 90 s)"
echo "   failed in ${elapsed} s with: $(grep -m1 -- 'no-build-isolation' "$work/isolated.log" | sed 's/^ *//')"

step "the README's Install block"
# NOTE: the block between the install-block markers of README.md, with its venv and checkout paths replaced.
block=$(sed -n '/<!-- install-block:begin -->/,/<!-- install-block:end -->/p' "$root/README.md" |
  grep -E '^(python3 |s2d-env/bin/python )' || true)
[ -n "$block" ] || fail "README.md has no install block"
while IFS= read -r line; do
  line=${line%%#*}
  [[ $line == python3\ -m\ venv* ]] && continue  # the venv exists already (made above, from $python)
  command=${line//s2d-env\/bin\/python/$py}
  command=${command//\/path\/to\/s2d_ext/$root}
  echo "   \$ $line"
  eval "$command" >"$work/install.log" 2>&1 || { tail -40 "$work/install.log"; fail "README step failed: $line"; }
done <<<"$block"

step "use it from outside the checkout"
cd "$work"
sed -n '/<!-- use-snippet:begin -->/,/<!-- use-snippet:end -->/p' "$root/README.md" |
  sed -n '/^```python$/,/^```$/p' | sed '1d;$d' >"$work/use.py"
[ -s "$work/use.py" ] || fail "README.md has no Use snippet"
"$py" -c "import s2d_ext, s2d_ext._native as n, sys; \
where = s2d_ext.__file__; assert where.startswith('$work'), where; \
assert all(n._NATIVE.values()), n._NATIVE; print('   s2d_ext from', where, 'native', n._NATIVE)"
"$py" "$work/use.py" || fail "the README's Use snippet failed"
"$work/s2d-env/bin/s2d" --help | head -1 | grep -q "^usage: s2d " || fail "s2d --help"
"$work/s2d-env/bin/s2d" bench --help >/dev/null || fail "s2d bench --help from the wheel"

step "the same from a git URL"
"$py" -m pip install -q --no-build-isolation --force-reinstall --no-deps "git+file://$root" >"$work/git.log" 2>&1 ||
  { tail -40 "$work/git.log"; fail "pip install git+file://"; }
"$py" "$work/use.py" || fail "the Use snippet after the git-URL install"
step "passed"
