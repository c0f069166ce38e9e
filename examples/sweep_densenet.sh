#!/usr/bin/env bash
# Section 3 of docs/results.md, end to end: train a small DenseNet untied on Fashion-MNIST with
# kshare's own commands, sweep policies, budget plans and relaxations over it at matched sizes
# (once as tied, once with BatchNorm statistics re-estimated after tying), then re-render the
# results page. About 45 minutes on 2 CPU cores.
set -euo pipefail
work=${WORK:-results/sweep}
mkdir -p "$work"
kshare apply torchvision.models.densenet:DenseNet -k growth_rate=12 -k "block_config=(4,4,4)" \
    -k num_init_features=24 -k num_classes=10 -g none --out "$work/densenet_small.pt"
kshare finetune "$work/densenet_small.pt" --data fashion-mnist --epochs 5 --lr 3e-3 \
    --limit-train 6000 --limit-test 5000 --out "$work/densenet_small.ft.pt"
for calibrate in 0 2048; do
    name=sweep_densenet$([ "$calibrate" = 0 ] || echo _calibrated)
    kshare sweep "$work/densenet_small.ft.pt" --data fashion-mnist --policies all,stage \
        --relax none,scale,lora:1,lora:4 --match stage,all --size-tolerance 0.005 --calibrate "$calibrate" \
        --epochs 2 --loss ce,kd --seeds 0,1,2 --lr 1e-3 --limit-train 6000 --limit-test 5000 \
        --out "docs/results/$name.json"
done
python examples/reproduce_paper.py --sweep docs/results/sweep_densenet.json docs/results/sweep_densenet_calibrated.json \
    --sweep-script examples/sweep_densenet.sh
