#!/usr/bin/env bash
# The GPU check of the Phase 1 issue, as one prepared script: import NEU-DET, train the
# faithful DEIMv2-S (deimv2-dinov3-s, 224 px, from scratch) for EPOCHS epochs on one GPU,
# then print images per second and the val mAP reached per epoch.
#   NEU=/path/to/neu-det EPOCHS=12 bash benchmarks/gpu_neu_dinov3_s.sh
# About 8 minutes on one H100 with the defaults (measure, then size EPOCHS to your budget).
set -euo pipefail
NEU=${NEU:-../shared/datasets/neu-det}
EPOCHS=${EPOCHS:-12}
OUT=${OUT:-runs/gpu_neu_s}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())"
defectfusion data import-neu --src "$NEU" --out data/neu
defectfusion train phase1 --config params.yaml configs/neu.yaml \
  --set phase1.epochs="$EPOCHS" --set phase1.patience=0 --set phase1.ema_decay=0 --out "$OUT"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
n_train = len(json.loads(Path("data/neu/annotations/train.json").read_text())["images"])
for row in map(json.loads, (run / "history.jsonl").read_text().splitlines()):
    ips = n_train / row["seconds"] if row.get("seconds") else float("nan")
    print(f"epoch {row['epoch']:3d}  {ips:8.1f} train images/s  val mAP {row['val_map']:.4f}  mAP50 {row['val_map50']:.4f}")
PY
