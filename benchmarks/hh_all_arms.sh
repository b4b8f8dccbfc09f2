#!/usr/bin/env bash
# usage: bash benchmarks/hh_all_arms.sh [SEED [ARM ...]]   (no ARM: central fedbis fedbiscuit)
# Every HH pair, 16 clients (4 per subset), the same pairs shown for every arm (~9,700 = 2 epochs of the
# 4,838 training pairs; the config's 3 did not fit a session beside the rest), one after the other with both
# threads; each writes runs/issue18/all_<arm>_s<SEED>/.
#   central     configs/hh_centralized.yaml with 2 epochs: 1,210 steps x 8 pairs, warm-up 50, cosine
#   fedbis      4 clients a round x 16 local steps x 2 pairs (8 pairs per parallel step, as one central step),
#               76 rounds = 1,216 sequential steps, warm-up 50 and cosine across rounds, FedAvg
#   fedbiscuit  the same rounds and steps, K=2: warm-up 10 rounds per selector, regrouping every 10 rounds on
#               each client's whole held-out slice
#   fedbiscuit_k4  the same with K=4 and a warm-up of 5 rounds per selector (20 warm-up rounds, as K=2's)
#   fedbiscuit_upd, fedbiscuit_k4_upd  fedbiscuit / fedbiscuit_k4 grouping by update directions
#               (federated.fedbiscuit.grouping=updates: each grouping trains every client once on the selectors'
#               mean and clusters the changes) instead of held-out losses
#   fedbiscuit_grad, fedbiscuit_k4_grad  the same grouping by gradient directions (grouping=gradients: one plain
#               gradient step over 64 training pairs per client); fedbiscuit_k4_grad is configs/hh_fedbiscuit.yaml as it is
#               (session 10: its defaults), the others override it
#   oracle      the same rounds and steps, a selector per HH subset trained by that subset's clients from round 0:
#               FedBiscuit's clusters as they would be if every grouping found the subsets
#   local       the same rounds and steps, every client its own selector (a client trains when sampled)
#   central_top2, fedbis_top2  central / fedbis with LoRA in the top 2 blocks at twice the rank (the same
#               number of adapter parameters, about half a step's work; its own trunk store, built first)
#   central_top1, fedbis_top1  the same in the last block only at rank 64 (its own trunk store, built first)
#   fedbis_top1_3ep, fedbis_top2_3ep  fedbis_top1 / fedbis_top2 for three epochs (114 rounds): the issue's speed
#               target, and the same pairs shown at top 2 for its paired agreement test
#   fedbiscuit_k4_grad_top1  fedbiscuit_k4_grad in the last block only at rank 64 (the speed target on the arm that wins)
#   fedbis_ls4, fedbis_top1_ls4  fedbis / fedbis_top1 with 4 local steps a round and 4x the rounds (304): the same
#               pairs shown and sequential steps, a quarter of the local drift between averagings (a client-drift remedy)
#   fedbis_lr2  fedbis at twice the client rate (2e-3): a client's AdamW step on 2 pairs carries about half the
#               signal of a centralized step on 8 where gradient noise dominates (fedbis_homogeneous.sh, a11)
# Figures: BENCHMARKS.md, "Every HH pair, 16 clients"; compare with benchmarks/paired_runs.py.
set -u
cd "$(dirname "$0")/.."
export FEDBISCUIT_DATA_DIR=${FEDBISCUIT_DATA_DIR:-../shared/data}
seed=${1:-0}
shift || true
arms=("$@"); [ ${#arms[@]} -eq 0 ] && arms=(central fedbis fedbiscuit)
out=runs/issue18; mkdir -p $out
seq=(train.batch_size=2 federated.clients_per_round=4 federated.local_steps=16 federated.rounds=76
     train.lr=1e-3 train.schedule=cosine train.warmup_steps=50 federated.eval_every=76
     federated.checkpoint_every=20 eval.before_training=true)
ls4=(federated.local_steps=4 federated.rounds=304 federated.eval_every=304 federated.checkpoint_every=80)
run() { local name=$1; shift; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run "$@" name=$name seed=$seed \
          output_dir=$out --quiet --overwrite > $out/$name.log 2>&1; echo "$name done $(date +%T)" >> $out/arms.done; }
# FedBiscuit with K selectors, W warm-up rounds each (K*W = 20 warm-up rounds), regrouping every 10, a grouping rule
fedbiscuit_arm() { run all_$1_s$seed configs/hh_fedbiscuit.yaml "${seq[@]}" federated.fedbiscuit.num_selectors=$2 \
                     federated.fedbiscuit.warmup_rounds=$3 federated.fedbiscuit.regroup_every=10 \
                     federated.fedbiscuit.grouping=$4 "${@:5}"; }
known=" central fedbis fedbiscuit fedbiscuit_k4 fedbiscuit_upd fedbiscuit_k4_upd fedbiscuit_grad fedbiscuit_k4_grad oracle local fedbis_lr2 fedbis_ls4 central_top2 fedbis_top2 central_top1 fedbis_top1 fedbis_top1_3ep fedbis_top2_3ep fedbiscuit_k4_grad_top1 fedbis_top1_ls4 "
for arm in "${arms[@]}"; do  # every name checked before a store build can take half an hour
  case "$known" in *" $arm "*) ;; *) echo "unknown arm $arm (known:$known)"; exit 2 ;; esac
done
declare -A stored  # top-n trunk stores built (or found) in this invocation
for arm in "${arms[@]}"; do
  case $arm in  # the default (top 4) store, once, before the first arm that trains at top 4
    *_top[0-9]*) ;;
    *) if [ -z "${stored[4]:-}" ]; then
         .venv/bin/python benchmarks/trunk_cache.py configs/hh_centralized.yaml > $out/all_cache_build.log 2>&1
         stored[4]=1
       fi ;;
  esac
  case $arm in
    central) run all_central_s$seed configs/hh_centralized.yaml train.epochs=2 ;;
    fedbis) run all_fedbis_s$seed configs/hh_fedbis.yaml "${seq[@]}" ;;
    fedbiscuit) fedbiscuit_arm fedbiscuit 2 10 loss ;;
    fedbiscuit_k4) fedbiscuit_arm fedbiscuit_k4 4 5 loss ;;
    fedbiscuit_upd) fedbiscuit_arm fedbiscuit_upd 2 10 updates ;;
    fedbiscuit_k4_upd) fedbiscuit_arm fedbiscuit_k4_upd 4 5 updates ;;
    fedbiscuit_grad) fedbiscuit_arm fedbiscuit_grad 2 10 gradients ;;
    fedbiscuit_k4_grad) fedbiscuit_arm fedbiscuit_k4_grad 4 5 gradients ;;
    oracle) run all_oracle_s$seed configs/hh_fedbis.yaml "${seq[@]}" federated.algorithm=oracle ;;
    fedbis_lr2) run all_fedbis_lr2_s$seed configs/hh_fedbis.yaml "${seq[@]}" train.lr=2e-3 eval.heldout_every=76 ;;
    fedbis_ls4) run all_fedbis_ls4_s$seed configs/hh_fedbis.yaml "${seq[@]}" "${ls4[@]}" ;;
    local) run all_local_s$seed configs/hh_fedbis.yaml "${seq[@]}" federated.algorithm=local ;;
    central_top2|fedbis_top2|central_top1|fedbis_top1|fedbis_top1_3ep|fedbis_top2_3ep|fedbiscuit_k4_grad_top1|fedbis_top1_ls4)
      n=${arm#*_top}; n=${n%%_*}; r=$(( 64 / n ))  # LoRA in the top n blocks at rank 64/n: the same parameters
      top=(model.lora.top_layers=$n model.lora.r=$r model.lora.alpha=$(( 2 * r )))
      if [ -z "${stored[$n]:-}" ]; then  # once per invocation: a second pass only finds every pair and overwrites the log
        .venv/bin/python benchmarks/trunk_cache.py configs/hh_centralized.yaml "${top[@]}" > $out/all_cache_build_top$n.log 2>&1
        stored[$n]=1
      fi
      case $arm in
        central_top*) run all_${arm}_s$seed configs/hh_centralized.yaml train.epochs=2 "${top[@]}" ;;
        fedbis_top*_3ep) run all_${arm}_s$seed configs/hh_fedbis.yaml "${seq[@]}" "${top[@]}" federated.rounds=114 \
                           federated.eval_every=114 ;;
        fedbis_top*_ls4) run all_${arm}_s$seed configs/hh_fedbis.yaml "${seq[@]}" "${top[@]}" "${ls4[@]}" ;;
        fedbiscuit_k4_grad_top*) fedbiscuit_arm ${arm} 4 5 gradients "${top[@]}" ;;
        *) run all_${arm}_s$seed configs/hh_fedbis.yaml "${seq[@]}" "${top[@]}" ;;
      esac ;;
  esac
done
