#!/usr/bin/env bash
# Fetch, where PyPI is reachable, what a lent GPU machine (Python 3.12, PyTorch 2.11+cu130, no
# network) lacks for this project's GPU checks, to be carried to it:
#   - mamba-ssm's sdist (pinned), from which tools/build_mamba_scan.py builds only its
#     selective-scan CUDA extension (no install, none of its Python dependencies);
#   - wheels of webdataset and braceexpand (py3-none-any), and PyYAML for CPython 3.12 manylinux
#     (webdataset imports yaml at import time; numpy and torch are there already);
#   - DeepSpeed (a wheel built here from its sdist, without ops: pure Python) and the packages it
#     needs that the machine lacks (hjson, pydantic and its parts), for the ZeRO step;
#   - diffusers and importlib_metadata, for encoding with an AutoencoderKL.
# On the GPU machine: python3 -m pip install --no-index --find-links DIR webdataset deepspeed diffusers
# Usage: bash tools/gpu_deps.sh [DIR]   (default .gpu_deps; idempotent: present files are kept)
set -euo pipefail
DIR=${1:-.gpu_deps}
PY=${PYTHON:-python3}
MAMBA_VERSION=2.3.2.post1
MAMBA_SHA256=104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 PyYAML==6.0.4 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.15.0 diffusers==0.42.1
        importlib_metadata==10.2.0)
DEEPSPEED_VERSION=0.19.8
mkdir -p "$DIR"

sdist="$DIR/mamba_ssm-$MAMBA_VERSION.tar.gz"
if [[ -f $sdist ]] && echo "$MAMBA_SHA256  $sdist" | sha256sum -c --status; then
    echo "present: $sdist"
else
    # The release's sdist URL from PyPI's JSON API (pip download would try to build its metadata).
    # (Some mirrors answer with URLs relative to the JSON's.)
    api=https://pypi.org/pypi/mamba-ssm/json
    url=$(curl -fsSL "$api" | "$PY" -c "
import json, sys, urllib.parse
files = json.load(sys.stdin)['releases']['$MAMBA_VERSION']
print(urllib.parse.urljoin('$api', next(f['url'] for f in files if f['packagetype'] == 'sdist')))")
    curl -fsSL -o "$sdist.part" "$url"
    echo "$MAMBA_SHA256  $sdist.part" | sha256sum -c --status || { echo "sha256 mismatch: $url" >&2; exit 1; }
    mv "$sdist.part" "$sdist"
    echo "fetched: $sdist ($url)"
fi

# Wheels for the GPU machine's interpreter, whatever this machine runs (pip keeps present files).
before=$(ls "$DIR")
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${WHEELS[@]}"
for f in "$DIR"/*.whl; do
    name=$(basename "$f")
    if grep -qxF "$name" <<<"$before"; then echo "present: $f"; else echo "fetched: $f"; fi
done

# DeepSpeed publishes only an sdist: build its wheel here, ops left to JIT (DS_BUILD_OPS=0), with
# this interpreter's torch (no build isolation: that would download another torch).
if compgen -G "$DIR/deepspeed-$DEEPSPEED_VERSION-*.whl" >/dev/null; then
    echo "present: $(ls "$DIR"/deepspeed-$DEEPSPEED_VERSION-*.whl)"
else
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DIR" "deepspeed==$DEEPSPEED_VERSION"
    echo "fetched: $(ls "$DIR"/deepspeed-$DEEPSPEED_VERSION-*.whl) (built here)"
fi
