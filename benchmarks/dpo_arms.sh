#!/usr/bin/env bash
# usage: bash benchmarks/dpo_arms.sh [SEED [ARM ...]]   (no ARM: central fedbis feddpo fedsft)
# Issue 16's DPO arms: SmolLM2 tuned with DPO on its own candidates for helpful-base train prompts, labelled by
# selectors, against the initial policy on 320 helpful-base test prompts neither the policy nor a labeller saw,
# judged by the gold judge (a selector trained centrally on helpful-online + helpful-rejection-sampled only:
# runs/issue16/gold_helpful_other, 63.6% [58.4, 68.4] on helpful-base's test pairs), with the length-controlled
# win rate beside. Every arm: the same 256 training prompts, 2 candidates each, the same DPO settings
# (configs/hh_rlhf_dpo.yaml: beta 0.1, lr 1e-4, 2 epochs); the initial policy's candidates and answers are
# cached and shared across arms. Each writes runs/issue16/dpo_<arm>_s<SEED>/.
#   central      labels from the centralized helpful-base selector (runs/issue18/hb_central, 66.0%)
#   fedbis       labels from FedBis on helpful-base in 4 clients (runs/issue18/hb_a7_seq, 65.7%)
#   fedbiscuit   labels from FedBiscuit K=2's vote on harmless-base + helpful-base (8 clients, gradient
#                grouping), trained first if runs/issue16/hbh_fedbiscuit has no final checkpoint
#   fedbiscuit_k4  labels from the vote of FedBiscuit K=4's selectors on every HH pair (16 clients, gradient
#                grouping: runs/issue18/all_fedbiscuit_k4_grad_s0, own cluster 59.9%, helpful-base 63.1%): the
#                FedBiscuit whose grouping found the raters (hbh_fedbiscuit's K=2 did not: 48.9%, BENCHMARKS.md)
#   fedbiscuit_k2loss  labels from FedBiscuit K=2's vote on harmless-base + helpful-base (8 clients) with the
#                recipe that split those two groups in session 6 (loss grouping every 5 rounds, 2 clients a round x
#                16 local steps x 8 pairs, 31 rounds, constant rate): an independent labeller (no gold-judge
#                raters), trained first if runs/issue16/hbh_fedbiscuit_k2loss has no final checkpoint
#   feddpo       baseline: DPO on the clients' own human pairs, federated (the federated section's rounds)
#   fedsft       baseline: federated SFT on the clients' preferred answers
# Then: python benchmarks/paired_winrates.py --compare runs/issue16/dpo_feddpo_s0 runs/issue16/dpo_central_s0 ...
# TRAIN_ONLY=1: a labeller arm that trains its selectors first stops after training them.
# Sizes: PROMPTS=256 EVAL=320 by default (environment). CURVE=N: the selector arms also draw the over-optimization
# curve, the policy kept every N DPO steps and judged by the gold judge and by its labelling selectors
# (rlhf.curve_every; each point one more generation over the EVAL prompts).
set -u
cd "$(dirname "$0")/.."
export FEDBISCUIT_DATA_DIR=${FEDBISCUIT_DATA_DIR:-../shared/data}
seed=${1:-0}
shift || true
arms=("$@"); [ ${#arms[@]} -eq 0 ] && arms=(central fedbis feddpo fedsft)
out=runs/issue16; mkdir -p $out
gold=runs/issue16/gold_helpful_other/checkpoints/selector.safetensors
[ -f $gold ] || { echo "no gold judge at $gold (BENCHMARKS.md, issue 16 session 8, builds it)"; exit 2; }
common=("data.subsets=[helpful-base]" data.max_eval_pairs_per_client=null rlhf.num_prompts=${PROMPTS:-256}
        rlhf.eval_prompts=${EVAL:-320} rlhf.best_of_n=0 rlhf.judge.kind=selector rlhf.judge.checkpoint=$gold
        seed=$seed output_dir=$out --quiet --overwrite)
curve=(rlhf.curve_every=${CURVE:-0})
# the selector arms run configs/hh_rlhf_dpo.yaml; the baselines configs/hh_rlhf_baselines.yaml (CONFIG=...)
run() { local name=$1; shift; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run ${CONFIG:-configs/hh_rlhf_dpo.yaml} "$@" \
          name=$name "${common[@]}" > $out/$name.log 2>&1; echo "$name done $(date +%T)" >> $out/arms.done; }
# a labeller trained here counts as there only once its last round's checkpoint is (a failed or stopped run's
# folder is trained again, not read half-done)
finished() { [ -f $out/$1/checkpoints/round-$(printf %06d $2).safetensors ]; }
for arm in "${arms[@]}"; do
  case $arm in
    central) run dpo_central_s$seed rlhf.selectors_from=runs/issue18/hb_central "${curve[@]}" ;;
    fedbis) run dpo_fedbis_s$seed rlhf.selectors_from=runs/issue18/hb_a7_seq "${curve[@]}" ;;
    fedbiscuit)
      # configs/hh_fedbiscuit.yaml (gradient grouping) with K=2 on the two groups of raters, 8 clients, all 8 a
      # round: each selector's 4 clients take a7's steps (16 local steps x 2 pairs, 31 rounds). The earlier
      # recipe here (2 clients a round, loss grouping) inherited the config's 2-pair batches, showed a quarter
      # of the pairs and learned nothing (own cluster 51.4%; runs/issue16/hbh_fedbiscuit_batch2_failed)
      if ! finished hbh_fedbiscuit 31; then
        .venv/bin/fedbiscuit run configs/hh_fedbiscuit.yaml "data.subsets=[harmless-base,helpful-base]" \
          federated.rounds=31 federated.clients_per_round=8 federated.eval_every=31 federated.checkpoint_every=10 \
          federated.fedbiscuit.num_selectors=2 federated.fedbiscuit.warmup_rounds=5 \
          federated.fedbiscuit.regroup_every=10 train.warmup_steps=50 \
          name=hbh_fedbiscuit seed=0 output_dir=$out --quiet --overwrite > $out/hbh_fedbiscuit.log 2>&1
      fi
      run dpo_fedbiscuit_s$seed rlhf.selectors_from=$out/hbh_fedbiscuit "${curve[@]}" ;;
    fedbiscuit_k2loss)
      if ! finished hbh_fedbiscuit_k2loss 31; then
        /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run configs/hh_fedbiscuit.yaml "data.subsets=[harmless-base,helpful-base]" \
          federated.rounds=31 federated.clients_per_round=2 federated.local_steps=16 train.batch_size=8 \
          train.schedule=constant train.warmup_steps=0 federated.eval_every=31 federated.checkpoint_every=10 \
          eval.heldout_every=10 federated.fedbiscuit.num_selectors=2 federated.fedbiscuit.warmup_rounds=5 \
          federated.fedbiscuit.regroup_every=5 federated.fedbiscuit.grouping=loss \
          name=hbh_fedbiscuit_k2loss seed=0 output_dir=$out --quiet --overwrite > $out/hbh_fedbiscuit_k2loss.log 2>&1
      fi
      [ "${TRAIN_ONLY:-0}" = 1 ] || run dpo_fedbiscuit_k2loss_s$seed rlhf.selectors_from=$out/hbh_fedbiscuit_k2loss "${curve[@]}" ;;
    fedbiscuit_k4) run dpo_fedbiscuit_k4_s$seed rlhf.selectors_from=runs/issue18/all_fedbiscuit_k4_grad_s0 "${curve[@]}" ;;
    # 16 rounds x 4 clients x 2 local steps x 4 pairs: the 512 pairs the selector arms' DPO shows (128 steps x 4)
    # (the config's 8 rounds showed half; sequential steps: 32 against 128)
    # (until session 21 these ran configs/hh_rlhf_dpo.yaml with rlhf.selectors_from=null rlhf.dpo.epochs=1, whose
    # train section and federated.eval_every they did not read: the same runs)
    feddpo|fedsft) CONFIG=configs/hh_rlhf_baselines.yaml run dpo_${arm}_s$seed rlhf.method=$arm federated.rounds=16 ;;
    *) echo "unknown arm $arm (central fedbis fedbiscuit fedbiscuit_k2loss fedbiscuit_k4 feddpo fedsft)"; exit 2 ;;
  esac
done
