#!/usr/bin/env bash
# Set up a poolkit development environment from a clean clone; safe to run again.
# Usage: bash scripts/setup.sh [--system] [--example fastapi|django]
#   (default)  .venv with poolkit editable and its "dev" extra (test + bench + lint): what the tests need
#   --example  only what that example app needs (".[fastapi,prometheus,embedded]"), nothing for tests
#   --system   also install Debian's pgbouncer, chromium, chromium-driver when missing (needs root
#              and apt-get; otherwise it names what is missing and the tests that need it skip)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

system=0
example=""
while [ $# -gt 0 ]; do
  case "$1" in
    --system) system=1 ;;
    --example)
      [ $# -ge 2 ] || { echo "setup: --example needs fastapi or django" >&2; exit 2; }
      example=$2
      shift
      ;;
    --example=*) example=${1#--example=} ;;
    -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# What to install, and the modules whose import proves it is installed.
case "$example" in
  "") spec=".[dev]"; extra=(); probe="pytest, pytest_timeout, fastapi, django, sqlalchemy, mypy" ;;
  # prometheus: the examples serve /metrics.
  fastapi) spec=".[fastapi,prometheus,embedded]"; extra=(); probe="fastapi, uvicorn, prometheus_client" ;;
  # gunicorn serves the Django example; it is no dependency of poolkit[django].
  django) spec=".[django,prometheus,embedded]"; extra=("gunicorn>=22"); probe="django, gunicorn, prometheus_client" ;;
  *) echo "setup: unknown example: $example (fastapi or django)" >&2; exit 2 ;;
esac

say() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

# -- 1. virtualenv ---------------------------------------------------------------------------------
if [ -x .venv/bin/python ] && python_ok .venv/bin/python; then
  say ".venv present ($(.venv/bin/python -V 2>&1))"
elif [ -e .venv ]; then
  die ".venv exists but holds no working Python >= 3.11: remove it (rm -rf .venv) and run again"
else
  py=""
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      py=$candidate
      break
    fi
  done
  [ -n "$py" ] || die "poolkit needs Python >= 3.11; python3 is $(python3 -V 2>&1 || echo missing)"
  say "creating .venv with $py ($("$py" -V 2>&1))"
  "$py" -m venv .venv || die "'$py -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
fi

# -- 2. Python dependencies (skipped while pyproject.toml and what was installed are unchanged) ---
stamp=.venv/.poolkit-setup-stamp
hash=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
installed() {
  .venv/bin/python -c "import importlib.metadata as m; m.version('poolkit'); import $probe" >/dev/null 2>&1
}
# The dev install holds every example's dependencies too.
if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$hash $spec" ] || [ "$(cat "$stamp")" = "$hash .[dev]" ]; } \
  && installed; then
  say "python dependencies up to date"
else
  say "installing poolkit: pip install -e \"$spec\"${extra[*]:+ ${extra[*]}}"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec" ${extra[@]+"${extra[@]}"} \
    || die "pip install -e \"$spec\" failed (see the output above)"
  echo "$hash $spec" >"$stamp"
fi

# -- 3. Debian packages (--system only) ------------------------------------------------------------
if [ "$system" = 1 ]; then
  packages=(pgbouncer chromium chromium-driver)
  missing=()
  if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${packages[@]}"; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
    done
  else
    missing=("${packages[@]}")
  fi
  # Without them the PgBouncer and browser tests skip, each saying what is missing.
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages present: ${packages[*]}"
  elif ! command -v apt-get >/dev/null 2>&1; then
    warn "--system needs apt-get: not installing ${missing[*]}; the tests that need them skip"
  elif [ "$(id -u)" != 0 ]; then
    warn "--system needs root to install ${missing[*]}; the tests that need them skip." \
      "Install them with: sudo apt-get install --no-install-recommends ${missing[*]}"
  else
    say "installing Debian packages: ${missing[*]} (apt-get update first)"
    export DEBIAN_FRONTEND=noninteractive
    apt_opts=(-q -o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30)
    if apt-get "${apt_opts[@]}" update >/dev/null \
      && apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null; then
      say "installed: ${missing[*]}"
    else
      warn "apt-get could not install ${missing[*]}; the tests that need them skip"
    fi
  fi
fi

if [ -n "$example" ]; then
  # The example prints its own address (API docs, dashboard) once it serves.
  say "done; starting the $example example"
else
  say "done; run the tests with: .venv/bin/python -m pytest"
fi
