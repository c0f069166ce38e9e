#!/usr/bin/env bash
# Section 3 of docs/results.md, end to end: train a small DenseNet untied on Fashion-MNIST with
# kshare's own commands, sweep policies, budget plans and relaxations over it at matched sizes,
# then re-render the results page. Two regimes (PARTS picks which run; both by default):
#
#   short    the baseline sees 6,000 images for 5 epochs and every point is fine-tuned for
#            2 epochs on the same 6,000 (40% of the baseline's steps), once as tied and once
#            with BatchNorm statistics re-estimated after tying. About 45 minutes.
#   trained  two baselines (training seeds 0 and 1) see all 60,000 images for 4 epochs and every
#            point gets one epoch on 6,000 (2.5% of the baseline's steps): the retrofit setting,
#            where what tying keeps of the trained model matters. About 55 minutes.
#
# On 2 CPU cores; the published figures were made with OMP_NUM_THREADS=1 (thread count moves
# float sums, so other counts give slightly different numbers).
set -euo pipefail
work=${WORK:-results/sweep}
parts=${PARTS:-short trained}
mkdir -p "$work"
model=(torchvision.models.densenet:DenseNet -k growth_rate=12 -k "block_config=(4,4,4)"
       -k num_init_features=24 -k num_classes=10)
grid=(--data fashion-mnist --policies all,stage --relax none,scale,lora:1,lora:4,lora:auto --match stage,all
      --size-tolerance 0.005 --loss ce,kd --seeds 0,1,2 --lr 1e-3 --limit-train 6000)
kshare apply "${model[@]}" -g none --out "$work/densenet_small.pt"

if [[ " $parts " == *" short "* ]]; then
    kshare finetune "$work/densenet_small.pt" --data fashion-mnist --epochs 5 --lr 3e-3 \
        --limit-train 6000 --limit-test 5000 --out "$work/densenet_small.ft.pt"
    for calibrate in 0 2048; do
        name=sweep_densenet$([ "$calibrate" = 0 ] || echo _calibrated)
        kshare sweep "$work/densenet_small.ft.pt" "${grid[@]}" --calibrate "$calibrate" --epochs 2 \
            --limit-test 5000 --out "docs/results/$name.json"
    done
fi
if [[ " $parts " == *" trained "* ]]; then
    for seed in 0 1; do  # two baselines: which kernels look alike is particular to each
        suffix=$([ "$seed" = 0 ] || echo "_seed$seed")
        kshare finetune "$work/densenet_small.pt" --data fashion-mnist --epochs 4 --lr 3e-3 --seed "$seed" \
            --out "$work/densenet_trained$suffix.ft.pt"
        kshare sweep "$work/densenet_trained$suffix.ft.pt" "${grid[@]}" --calibrate 2048 --epochs 1 \
            --out "docs/results/sweep_densenet_trained$suffix.json"
    done
fi

python examples/reproduce_paper.py --sweep docs/results/sweep_densenet.json \
    docs/results/sweep_densenet_calibrated.json docs/results/sweep_densenet_trained.json \
    docs/results/sweep_densenet_trained_seed1.json --sweep-script examples/sweep_densenet.sh
