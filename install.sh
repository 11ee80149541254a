#!/usr/bin/env bash
# Installs autocoder and what it needs on a Debian/Ubuntu machine:
# bubblewrap (the sandbox) from apt, then the package (and, with --test, its test tools) with pip
# into the Python that runs this script (your virtual environment, if one is active).
set -euo pipefail
cd "$(dirname "$0")"

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "install.sh: installing bubblewrap (the sandbox) with apt-get" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "install.sh: bubblewrap (bwrap) is missing and apt-get is not here; install it, or set AUTOCODER_SANDBOX=none to run code unconfined" >&2
  fi
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || python=python
"$python" -m pip install --disable-pip-version-check -q -e ".${extras}"
echo "install.sh: autocoder installed for $("$python" -c 'import sys; print(sys.executable)')" >&2
