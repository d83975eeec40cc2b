#!/usr/bin/env bash
# Reproduces the bundled demo model from scratch: synthetic slides -> `wsi-response train` -> held-out evaluation.
# Usage: models/train_demo.sh [DATA_DIR]   (default .cache/demo-data; about 5 min synth + 12 min training on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-.cache/demo-data}
WSI=${WSI:-.venv/bin/wsi-response}
PY=${PY:-.venv/bin/python}

# 1. Synthetic specimens (12000 x 9000 px at 0.25 µm/px): 4 training specimens, 2 held-out specimens, 2 slides each.
for s in 1 2 3 4; do
  [ -f "$DATA/train/train-$s/specimen.truth.json" ] || \
    $WSI synth --out "$DATA/train" --specimen "train-$s" --slides 2 --seed $((100 + s)) --size 12000x9000 --mpp 0.25
done
for s in 1 2; do
  [ -f "$DATA/val/val-$s/specimen.truth.json" ] || \
    $WSI synth --out "$DATA/val" --specimen "val-$s" --slides 2 --seed $((200 + s)) --size 12000x9000 --mpp 0.25
done

# 2. Train at the default tiling (1.0 µm/px, 224 px) on the full region annotations, and, as a check that the
#    workflow learns from what a pathologist draws, on the partial annotations (denser sampling: they are small).
COMMON=(--arch lcnet_050 --epochs 3 --val-split 0.25 --seed 0 --device cpu
        training.num_threads=1 training.max_tiles_per_class_per_slide=80 training.learning_rate=0.003)
$WSI train --slides "$DATA"/train/*/*.svs --annotations "$DATA"/train/*/*.annotations.geojson \
  --out models/demo-lcnet050-synthetic.safetensors "${COMMON[@]}" &
$WSI train --slides "$DATA"/train/*/*.svs --annotations "$DATA"/train/*/*.partial.geojson \
  --out "$DATA/demo-lcnet050-partial.safetensors" "${COMMON[@]}" training.sample_stride_um=16 &
wait

# 3. Tile-level metrics on the held-out specimens (never seen in training), full annotations as truth.
$PY models/evaluate_demo.py "$DATA/val" models/demo-lcnet050-synthetic.safetensors \
  "$DATA/demo-lcnet050-partial.safetensors" > models/demo-metrics.json
cat models/demo-metrics.json
