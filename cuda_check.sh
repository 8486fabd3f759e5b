#!/usr/bin/env bash
# One call to check every CUDA path, ready before a GPU is at hand (tests/test_cuda.py, then the bench).
#   bash cuda_check.sh prepare   # here, once: fills .gpu/ with what the GPU machine lacks
#   bash cuda_check.sh run       # on the GPU machine (carry .gpu); here it runs on the CPU and says
#                                # that the CUDA parts were skipped
# The GPU machine has Python 3.12 with torch 2.11 and torchvision 0.26, numpy, pillow, requests, tqdm,
# scipy and pytest, but not jieba, fire, visdom, torchnet or pycocoevalcap, and no network. .gpu/
# (ignored by git, about 40 MB) holds them as wheels, a pycocoevalcap without its 100 MB of Java files
# (BLEU, ROUGE-L and CIDEr-D; METEOR is then skipped with a warning), MobileNetV2's ImageNet weights
# and a few real photos. Logs and the bench's table go to $OUT (the device's folder) or .gpu/out. The
# tests get 300 s and the bench 180 s: one device call is at most 600 s.
set -euo pipefail
cd "$(dirname "$0")"
GPU=.gpu
case "${1:-run}" in
prepare)
  rm -rf "$GPU"
  mkdir -p "$GPU/wheels" "$GPU/site" "$GPU/torch/hub/checkpoints" "$GPU/photos"
  # pure Python: wheels built here (the source-only ones with setuptools<81, as install.sh does)
  python -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$GPU/wheels" \
      jieba==0.42.1 fire==0.7.1 termcolor six visdom==0.2.4 torchnet==0.0.4 jsonpatch jsonpointer websocket-client
  python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$GPU/wheels" 'tornado<6.6'
  python - "$GPU/site" <<'PY'
import os, shutil, sys, pycocoevalcap.bleu.bleu as bleu
source = os.path.dirname(os.path.dirname(bleu.__file__))
for part in ("bleu", "cider", "rouge", "meteor"):  # meteor.py only: its jar and data stay behind
    shutil.copytree(os.path.join(source, part), os.path.join(sys.argv[1], "pycocoevalcap", part),
                    ignore=lambda folder, names: [n for n in names if not n.endswith(".py")])
open(os.path.join(sys.argv[1], "pycocoevalcap", "__init__.py"), "w").close()
PY
  cp "$(python -c 'import torch; print(torch.hub.get_dir())')/checkpoints/mobilenet_v2-b0353104.pth" \
      "$GPU/torch/hub/checkpoints/"
  if [ -d ../shared/data/flickr8k-cn/images ]; then  # real photos for generate: CUDA against the CPU
    find ../shared/data/flickr8k-cn/images -name '*.jpg' | sort | head -64 | xargs -I{} cp {} "$GPU/photos/"
  fi
  du -sh "$GPU"
  ;;
run)
  NEEDED="import jieba, fire, visdom, torchnet.meter, pycocoevalcap.bleu.bleu"
  if ! python -c "$NEEDED" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$GPU"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD/$GPU/site${PYTHONPATH:+:$PYTHONPATH}"
    python -c "$NEEDED" || { echo "the carried packages do not import; run 'bash cuda_check.sh prepare' again"; exit 1; }
  fi
  if [ -d "$GPU/torch" ]; then export TORCH_HOME="$PWD/$GPU/torch"; fi
  OUT=${OUT:-$GPU/out}
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  python -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  status=0
  timeout 300 python -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1
  if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    timeout 180 python bench.py all 2>&1 | tee "$OUT/bench.log" || status=1
    cp data/bench/bench.json "$OUT/" 2>/dev/null || true
  else
    echo "no CUDA device: bench.py all on CUDA skipped"
  fi
  exit $status
  ;;
*)
  echo "usage: bash cuda_check.sh prepare|run" >&2
  exit 1
  ;;
esac
