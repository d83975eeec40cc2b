#!/usr/bin/env bash
# Trains the bundled demo model with `wsi-response train` and evaluates it on a generator setting it
# never saw: synthetic slides -> `wsi-response train` -> held-out evaluation.
#
#   models/train_demo.sh [DATA_DIR]      (default .cache/demo-data-v3)
#
# Data (one slide per specimen, PARTIAL annotations: eroded sketches, some regions not annotated,
# what a pathologist draws):
#   d1-d3  default setting, 6000 x 4500 px at 0.5 µm/px (seeds 101-103)
#   h1-h4  default setting, 8000 x 6000 px at 0.25 µm/px (seeds 121-124): a 40x scanner
#   b1-b3  lab-b setting, 6000 x 4500 px at 0.5 µm/px (seeds 111-113)
#   r1-r6  random setting (domain randomisation: each slide its own stain, scanner, morphology and
#          sub-type mix), 6000 x 4500 px at 0.5 µm/px (seeds 901-906)
# `train` holds out 4 of the 16 slides for validation (seed 4: d3, h1, b3, r5, one per setting).
# Test: 3 lab-c slides (seeds 301-303, full annotations as truth), a setting never trained on.
# Same inputs and seeds give the same weights on the same torch version and thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-.cache/demo-data-v3}
WSI=${WSI:-.venv/bin/wsi-response}
PY=${PY:-.venv/bin/python}

gen() {  # subdir specimen seed domain size mpp
  [ -f "$DATA/$1/$2/specimen.truth.json" ] || \
    $WSI synth --out "$DATA/$1" --specimen "$2" --slides 1 --seed "$3" --domain "$4" --size "$5" --mpp "$6" > /dev/null
}
for s in 1 2 3; do
  gen train d$s $((100 + s)) default 6000x4500 0.5
  gen train b$s $((110 + s)) lab-b 6000x4500 0.5
  gen test c$s $((300 + s)) lab-c 6000x4500 0.5
done
for s in 1 2 3 4; do gen train h$s $((120 + s)) default 8000x6000 0.25; done
for s in 1 2 3 4 5 6; do gen train r$s $((900 + s)) random 6000x4500 0.5; done

SLIDES=(); ANNOTATIONS=()
for n in d1 d2 d3 h1 h2 h3 h4 b1 b2 b3 r1 r2 r3 r4 r5 r6; do
  SLIDES+=("$DATA/train/$n/${n}_1.svs"); ANNOTATIONS+=("$DATA/train/$n/${n}_1.partial.geojson")
done
# the defaults (lcnet_050, 20 epochs, best epoch on validation, stain normalisation) with 25 % of the
# slides for validation and at most 12 tiles per annotated region (about 1,900 training tiles)
$WSI train --slides "${SLIDES[@]}" --annotations "${ANNOTATIONS[@]}" --out models/demo-lcnet050-synthetic.safetensors \
  --seed 4 --device cpu training.val_split=0.25 training.max_tiles_per_region=12 training.num_threads=2 \
  2>&1 | tee "$DATA/train.log"

# tile-level metrics on the unseen lab-c slides (every 224 µm grid tile at least half inside a full annotation)
$PY models/evaluate_demo.py --held-out "$DATA/test" models/demo-lcnet050-synthetic.safetensors > models/demo-metrics.json
cat models/demo-metrics.json
