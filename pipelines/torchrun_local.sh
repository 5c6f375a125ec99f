#!/usr/bin/env bash
# Both stages under torchrun on one machine, on the built-in digits: a working example of the
# multi-process path (CPU processes with gloo here; set NPROC to your GPU count and drop
# --device cpu on a GPU node).
#
#   bash pipelines/torchrun_local.sh [OUT]        (default OUT: runs/torchrun)
#
# It trains nothing for the teacher: a random-init timm test_resnet with a sharpened head is
# saved and used, which is enough to exercise the pipeline end to end.
set -euo pipefail
OUT=${1:-runs/torchrun}
NPROC=${NPROC:-2}
PY=${PY:-python}
mkdir -p "$OUT"
$PY - "$OUT/teacher.pth" <<'PYEOF'
import sys, timm, torch
torch.manual_seed(0)
m = timm.create_model("test_resnet", pretrained=False, num_classes=10)
with torch.no_grad():
    m.fc.weight.mul_(40)
torch.save(m.state_dict(), sys.argv[1])
PYEOF
VIEWS=(--img-size 32 --mix-group 64 --hflip 0 --color-jitter 0 --cutmix 1.0 --mix-prob 0.5)
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m tinydistill gen-logits \
  --data digits --teacher test_resnet --teacher-weights "$OUT/teacher.pth" --teacher-input-size 32 \
  --k 5 --epochs 2 --chunk-rows 128 --shard-rows 256 --workers 1 --device cpu --out "$OUT/logits.zarr" "${VIEWS[@]}"
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m tinydistill train-student \
  --logits "$OUT/logits.zarr" --data digits --val-data digits:val --val-crop-pct 1.0 --student test_vit \
  --model-kwargs patch_size=4 --epochs 2 --batch-size 32 --workers 1 --device cpu --out "$OUT/student"
$PY -m tinydistill inspect "$OUT/logits.zarr" --plot "$OUT/inspect.png"
