#!/usr/bin/env bash
# usage: bash benchmarks/tulu_arms.sh [SEED [ARM ...]]   (no ARM: central fedbis fedbiscuit fedbiscuit_grad local)
# The 16 Tulu annotators (one client per person, ties dropped: 442 train pairs, 7 to 70 per person), the HH
# recipe of benchmarks/hh_all_arms.sh scaled to them: the same pairs shown for every arm (~1,540 = 3.5 epochs, as
# configs/tulu_*.yaml), the same sequential steps (192), lr 1e-3, warm-up 20 steps and cosine. Each writes
# runs/issue18/tulu_<arm>_s<SEED>/; compare with benchmarks/paired_runs.py (they share the 107 test pairs).
#   central     one selector on everybody's pairs: 192 steps x 8 pairs
#   fedbis      4 people a round x 16 local steps x 2 pairs (8 pairs per parallel step), 12 rounds, FedAvg
#   fedbiscuit  the same rounds and steps, K=2: warm-up 2 rounds per selector, groupings at rounds 4 and 8 on
#               each person's whole held-out slice (the paper's loss grouping)
#   fedbiscuit_grad  the same, grouping by gradient directions (grouping=gradients, as configs/hh_fedbiscuit.yaml:
#               each person's plain gradient over up to 64 of their training pairs on the selectors' mean)
#   fedbiscuit_k4_grad  fedbiscuit_grad with K=4 (configs/hh_fedbiscuit.yaml's K and grouping on every HH pair):
#               warm-up 1 round per selector (the same 4 warm-up rounds as K=2), the same groupings at 4 and 8
#   local       the same rounds and steps, every person their own selector (trained when sampled)
set -u
cd "$(dirname "$0")/.."
export FEDBISCUIT_DATA_DIR=${FEDBISCUIT_DATA_DIR:-../shared/data}
seed=${1:-0}
shift || true
arms=("$@"); [ ${#arms[@]} -eq 0 ] && arms=(central fedbis fedbiscuit fedbiscuit_grad local)
out=runs/issue18; mkdir -p $out
root=data.root=$FEDBISCUIT_DATA_DIR/tulu-human-eval
common=(train.lr=1e-3 train.schedule=cosine train.warmup_steps=20 eval.before_training=true)
seq=(train.batch_size=2 federated.clients_per_round=4 federated.local_steps=16 federated.rounds=12
     federated.eval_every=12 federated.checkpoint_every=4)
run() { local name=$1; shift; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run "$@" "$root" "${common[@]}" \
          name=$name seed=$seed output_dir=$out --quiet --overwrite > $out/$name.log 2>&1
        echo "$name done $(date +%T)" >> $out/arms.done; }
for arm in "${arms[@]}"; do
  case $arm in
    central) run tulu_central_s$seed configs/tulu_centralized.yaml ;;
    fedbis) run tulu_fedbis_s$seed configs/tulu_fedbis.yaml "${seq[@]}" ;;
    fedbiscuit) run tulu_fedbiscuit_s$seed configs/tulu_fedbiscuit.yaml "${seq[@]}" \
                  federated.fedbiscuit.grouping_pairs=null ;;
    fedbiscuit_grad) run tulu_fedbiscuit_grad_s$seed configs/tulu_fedbiscuit.yaml "${seq[@]}" \
                  federated.fedbiscuit.grouping_pairs=null federated.fedbiscuit.grouping=gradients ;;
    fedbiscuit_k4_grad) run tulu_fedbiscuit_k4_grad_s$seed configs/tulu_fedbiscuit.yaml "${seq[@]}" \
                  federated.fedbiscuit.grouping_pairs=null federated.fedbiscuit.grouping=gradients \
                  federated.fedbiscuit.num_selectors=4 federated.fedbiscuit.warmup_rounds=1 ;;
    local) run tulu_local_s$seed configs/tulu_fedbis.yaml "${seq[@]}" federated.algorithm=local ;;
    *) echo "unknown arm $arm (central fedbis fedbiscuit fedbiscuit_grad fedbiscuit_k4_grad local)"; exit 2 ;;
  esac
done
