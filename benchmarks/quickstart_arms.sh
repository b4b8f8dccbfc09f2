#!/usr/bin/env bash
# usage: bash benchmarks/quickstart_arms.sh [SEED [ARM ...]]   (no ARM: loss grad)
# The demo's phase 1 (configs/quickstart.yaml without its rlhf section, pipeline federated) in variants, on the
# training split only (no test pairs: data.eval_split=null), which is what the demo's settings are chosen on. The
# arms vary session 17's demo, which grouped by held-out loss (the base written below sets that back); since
# session 18 the demo is grad1. Judge them on pairs no grouping scored, the training pairs each client's cap left
# out (session 17 judged on the held-out slices, whose pairs the loss grouping scores):
#   python benchmarks/paired_runs.py --split spare --compare runs/issue18/qs_loss_s0 runs/issue18/qs_grad1_s0
#   loss   session 17's demo: grouping by held-out loss every 4 rounds, 24 pairs per client
#   grad   the same, grouping by the clients' gradient directions (64 training pairs each, centred, k-means)
#   grad1  grad with one grouping only, at the end of the warm-up (round 4; regroup_every 20): in grad_s0 the
#          grouping at round 8 mixed the two groups that rounds 4 and 12 split. configs/quickstart.yaml since
#          session 18
#   demo   grad1 judged on the demo's 600 test pairs too (the untrained selectors first): the demo's phase 1 in
#          another seed; chooses nothing
#   p150   loss with 150 training pairs per client instead of 100 (the same rounds and pairs shown: 3 passes
#          over 600 pairs instead of 4.5 over 400); about 70 s more trunk states on the AMD EPYC
#   test   loss judged on the demo's 600 test pairs too (data.eval_split=test, the untrained selectors first): how
#          the demo's measured gain varies with the seed; chooses nothing (seed 0 is the demo itself)
#   r20    the same as loss with 20 rounds instead of 14 (the cosine schedule over the longer run): 43% more
#          sequential steps, about 85 s more on the AMD EPYC
#   all    loss with every held-out pair of each client scored at each grouping (grouping_pairs null: about 81
#          a client instead of 24), so a grouping's margins are 1.8x less noisy; about 2.5 min more on the AMD EPYC
#   top2   loss with LoRA in the top 2 blocks at r=32 (the same adapter parameters as top 4 at r=16): half a
#          step's and a scoring's work (BENCHMARKS.md, session 9); its own trunk store (blocks 0-27)
#   top2all  top2 and all together: the time top 2 saves pays for the whole held-out slices
#   top2grad1  top2 and grad1 together
# Each writes runs/issue18/qs_<arm>_s<SEED>/.
set -u
cd "$(dirname "$0")/.."
export FEDBISCUIT_DATA_DIR=${FEDBISCUIT_DATA_DIR:-../shared/data}
seed=${1:-0}
shift || true
arms=("$@"); [ ${#arms[@]} -eq 0 ] && arms=(loss grad)
out=runs/issue18; mkdir -p $out
base=$out/quickstart_phase1.yaml
.venv/bin/python - "$base" <<'PY'
import sys, yaml
cfg = yaml.safe_load(open("configs/quickstart.yaml"))
cfg.pop("rlhf")
cfg["pipeline"] = "federated"
cfg["data"]["eval_split"] = None
cfg["eval"]["before_training"] = False
cfg["eval"]["heldout_every"] = cfg["federated"]["rounds"]
fb = cfg["federated"]["fedbiscuit"]  # session 17's grouping, which the arms vary
fb.pop("grouping", None)
fb.update(regroup_every=4, grouping_pairs=24)
yaml.safe_dump(cfg, open(sys.argv[1], "w"), sort_keys=False)
PY
run() { local name=$1; shift; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run $base "$@" name=$name seed=$seed \
          output_dir=$out --quiet --overwrite > $out/$name.log 2>&1; echo "$name done $(date +%T)" >> $out/arms.done; }
# overrides several arms share
top2=(model.lora.top_layers=2 model.lora.r=32 model.lora.alpha=64)
grad=(federated.fedbiscuit.grouping=gradients federated.fedbiscuit.grouping_pairs=null)
grad1=("${grad[@]}" federated.fedbiscuit.regroup_every=20)
tested=(data.eval_split=test eval.before_training=true)
for arm in "${arms[@]}"; do
  case $arm in
    loss) run qs_loss_s$seed ;;
    grad) run qs_grad_s$seed "${grad[@]}" ;;
    grad1) run qs_grad1_s$seed "${grad1[@]}" ;;
    p150) run qs_p150_s$seed data.max_train_pairs_per_client=150 ;;
    test) run qs_test_s$seed "${tested[@]}" ;;
    demo) run qs_demo_s$seed "${grad1[@]}" "${tested[@]}" ;;
    all) run qs_all_s$seed federated.fedbiscuit.grouping_pairs=null ;;
    top2) run qs_top2_s$seed "${top2[@]}" ;;
    top2all) run qs_top2all_s$seed "${top2[@]}" federated.fedbiscuit.grouping_pairs=null ;;
    top2grad1) run qs_top2grad1_s$seed "${top2[@]}" "${grad1[@]}" ;;
    r20) run qs_r20_s$seed federated.rounds=20 federated.eval_every=20 eval.heldout_every=20 ;;
    *) echo "unknown arm $arm"; exit 2 ;;
  esac
done
