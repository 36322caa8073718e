#!/usr/bin/env bash
# The README's results table: every algorithm's paper protocol (conf/experiment/) with the number of
# iterations cut to about 15 minutes on a 2-core CPU (chosen from benchmarks/bench_algos.py's
# timings), plus sinusoid MAML vs Meta-SGD. MAML++'s multi-step loss anneals over the same first
# tenth of the run as in the paper (5000 of 50,000 iterations). Runs one after another into
# outputs/cpu_budget/<name>;
# rerunning the script resumes an interrupted run and skips finished ones.
#
#   METARUN_DATA_DIR=../shared/data bash benchmarks/cpu_budget_runs.sh [name ...]
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A RUNS=(
  [fomaml_omniglot_5w1s]="train.iterations=1500 train.val_every=300"
  [reptile_omniglot_5w1s]="train.iterations=2000 train.val_every=400 test.episodes=600"
  [metasgd_omniglot_5w1s]="train.iterations=800 train.val_every=200"
  [protonet_omniglot_5w1s]="train.iterations=600 train.val_every=150"
  [matchingnet_omniglot_5w1s]="train.iterations=450 train.val_every=150"
  [snail_omniglot_5w1s]="train.iterations=1000 train.val_every=250"
  [anil_omniglot_20w1s]="train.iterations=500 train.val_every=125"
  [maml_omniglot_20w1s]="train.iterations=500 train.val_every=125"   # ANIL's baseline at the same budget
  [mamlpp_omniglot_5w1s]="train.iterations=500 train.val_every=125 algo.msl_iterations=50"
  [maml_omniglot_5w1s]="train.iterations=1650 train.val_every=150"
  [maml_sinusoid_k5]="train.iterations=10000"
  [metasgd_sinusoid_k5]="train.iterations=10000"
  [maml_sinusoid_k10]="train.iterations=10000"
  [metasgd_sinusoid_k10]="train.iterations=10000"
)
ORDER=(fomaml_omniglot_5w1s reptile_omniglot_5w1s metasgd_omniglot_5w1s protonet_omniglot_5w1s
       matchingnet_omniglot_5w1s snail_omniglot_5w1s anil_omniglot_20w1s maml_omniglot_20w1s mamlpp_omniglot_5w1s maml_omniglot_5w1s
       maml_sinusoid_k5 metasgd_sinusoid_k5 maml_sinusoid_k10 metasgd_sinusoid_k10)

for name in "${@:-${ORDER[@]}}"; do
  dir="outputs/cpu_budget/$name"
  if [[ -f "$dir/metrics.json" ]]; then echo "$name: done"; continue; fi
  echo "$name: metarun train experiment=$name ${RUNS[$name]}"
  # shellcheck disable=SC2086
  metarun train "experiment=$name" ${RUNS[$name]} "hydra.run.dir=$dir"
done
