#!/usr/bin/env bash
# Set up and run the whole pipeline on built-in demo data:
# demo images -> preprocess -> features -> train (a few minutes on 2 CPU cores) -> generate.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
D=data/demo
python demo_data.py make --out=$D
python data_preprocess.py process --annotation-file=$D/train.json --caption-data-path=$D/caption.pth --min-appear=1
python data_preprocess.py process --annotation-file=$D/val.json --caption-data-path=$D/caption_val.pth \
    --vocab-from=$D/caption.pth
for split in caption caption_val; do
  python feature_extract.py extract --caption-data-path=$D/$split.pth --img-path=$D/images --backbone=mobilenet_v2
done
python main.py train --caption-data-path=$D/caption.pth --val-caption-data-path=$D/caption_val.pth \
    --checkpoint-dir=$D/checkpoints --overwrite --epoch=6 --scst-epoch=2 --plot-every=10 --eval-size=60 --env=demo
echo "Captions of five validation images (compare with $D/val.json):"
python main.py generate --img="$D/images/val_000[0-4].jpg" --checkpoint-dir=$D/checkpoints
