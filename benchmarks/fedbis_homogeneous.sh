#!/usr/bin/env bash
# usage: bash benchmarks/fedbis_homogeneous.sh ARM [ARM]   (one or two arms side by side: a0 a1 a2 a4 a6 a7 a8 a9 a10 a11 a12 a13 a14 a15 a16 c0;
# each writes runs/issue18/<name>/; SEED=N in the environment: seed N, the names ending in _sN; default 0, no suffix)
# Figures: BENCHMARKS.md, "Homogeneous raters", "Issue 18, session 19" (a7, a8, a9) and "Issue 18, session 20" (a0,
# a13, a14, a15), each of those in three seeds as labelled.
# The centralized reference: fedbiscuit run configs/hh_centralized.yaml name=hb_central "data.subsets=[helpful-base]"
# output_dir=runs/issue18
# Homogeneous raters: helpful-base in 4 clients, all 4 each round, 31 rounds x 4 local steps x 8 pairs
# (3,968 pairs shown; the centralized helpful-base run shows 500 x 8 = 4,000). One thread per run, two at once.
cd "$(dirname "$0")/.."
export FEDBISCUIT_DATA_DIR=${FEDBISCUIT_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
# eval.heldout_every: agreement on the clients' held-out slices of the training split at rounds 0 and 31, what
# a choice between arms is made on (the test pairs only report it)
# train.batch_size=8 train.schedule=constant train.warmup_steps=0: every arm starts from session 6's recipe and
# names its own changes. Why pinned: configs/hh_fedbis.yaml gained 2-pair batches, warm-up 50 and cosine at
# c55efb9 (session 7), after a0-a2 and a7's seed 0 ran; until session 19 every arm run later (a7's seeds 1 and 2,
# a9, a11-a14) inherited that schedule unnamed (BENCHMARKS.md, "Issue 18, session 19").
common=("data.subsets=[helpful-base]" federated.clients_per_round=4 federated.local_steps=4 federated.rounds=31
        federated.eval_every=31 federated.checkpoint_every=31 train.lr=1e-3 output_dir=runs/issue18
        eval.heldout_every=31 train.batch_size=8 train.schedule=constant train.warmup_steps=0)
seed=${SEED:-0}; sfx=""; [ "$seed" = 0 ] || sfx=_s$seed
cos=(train.schedule=cosine train.warmup_steps=12)
run() { local name=$1$sfx; shift; mkdir -p runs/issue18; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run configs/hh_fedbis.yaml name=$name seed=$seed "${common[@]}" "$@" --quiet --overwrite > runs/issue18/$name.log 2>&1; echo "$name done $(date +%T)" >> runs/issue18/arms.done; }
arm() {
  case $1 in
    a0) run hb_a0_avg ;;
    a1) run hb_a1_cos "${cos[@]}" ;;
    a2) run hb_a2_avgm "${cos[@]}" federated.server_optimizer.name=avgm federated.server_optimizer.momentum=0.9 ;;
    a6) run hb_a6_avgm75 "${cos[@]}" federated.server_optimizer.name=avgm federated.server_optimizer.momentum=0.75 ;;
    a4) run hb_a4_keepopt "${cos[@]}" federated.reset_optimizer=false ;;
    # as many sequential steps as the centralized run at the same pairs shown: each client takes 4x the steps
    # on a quarter of the batch, so a round's 4 clients together see 8 pairs per step, as one central step does
    a7) run hb_a7_seq train.batch_size=2 federated.local_steps=16 ;;
    a8) run hb_a8_seq_cos train.batch_size=2 federated.local_steps=16 train.schedule=cosine train.warmup_steps=50 ;;
    # a7 with each client's AdamW state kept across rounds (no cold, sign-like first steps each round)
    a9) run hb_a9_seq_keepopt train.batch_size=2 federated.local_steps=16 federated.reset_optimizer=false ;;
    # a8 with the kept AdamW state: the centralized run's schedule and warm optimizer on every client
    a10) run hb_a10_seq_cos_keepopt train.batch_size=2 federated.local_steps=16 train.schedule=cosine \
           train.warmup_steps=50 federated.reset_optimizer=false ;;
    # a7 at a higher client rate. Why: each client's AdamW divides by the root of its own second moment, which
    # at 2 pairs a step holds up to 4x the gradient noise of the centralized run's 8, so where noise dominates a
    # client's step carries half the signal; averaging 4 clients cuts the noise but not that. Twice the rate
    # (the square-root rule for Adam, Malladi et al. 2022) restores the signal; 1.4x is the midpoint.
    a11) run hb_a11_seq_lr2 train.batch_size=2 federated.local_steps=16 train.lr=2e-3 ;;
    a12) run hb_a12_seq_lr14 train.batch_size=2 federated.local_steps=16 train.lr=1.4e-3 ;;
    # a7 with a server optimizer (Reddi et al. 2021) on the round's mean change, at the rule of thumb the config
    # gives (train.lr x local_steps = 0.016: a round's travel of a coordinate the clients agree on), not tuned;
    # betas (0.9, 0.99), tau 1e-3: coordinates whose change flips sign from round to round (noise) move less
    a13) run hb_a13_seq_adam train.batch_size=2 federated.local_steps=16 federated.server_optimizer.name=adam \
           federated.server_optimizer.lr=0.016 ;;
    a14) run hb_a14_seq_yogi train.batch_size=2 federated.local_steps=16 federated.server_optimizer.name=yogi \
           federated.server_optimizer.lr=0.016 ;;
    # a7 with server momentum (FedAvgM) at server rate 1 - momentum: its steady-state step is FedAvg's, so what
    # changes is only that each round's mean change is smoothed over about 10 rounds. Why not the avgm defaults
    # (rate 1, momentum 0.9): they move 10x FedAvg's step once momentum builds, which a2 showed overshoots
    a15) run hb_a15_seq_avgm train.batch_size=2 federated.local_steps=16 federated.server_optimizer.name=avgm \
           federated.server_optimizer.lr=0.1 federated.server_optimizer.momentum=0.9 ;;
    # a9's kept AdamW state at a11's doubled client rate: the two changes that moved the test pairs up (a9 +1.8,
    # a11 on the Intel Xeon), together; kept state removes the cold sign-like first steps, the rate restores the
    # signal a 2-pair step loses to noise (a11's note)
    a16) run hb_a16_seq_keepopt_lr2 train.batch_size=2 federated.local_steps=16 federated.reset_optimizer=false \
           train.lr=2e-3 ;;
    # the centralized reference on the same pairs (500 steps x 8 pairs, warm-up 50, cosine)
    c0) mkdir -p runs/issue18; /usr/bin/time -f "%e s" .venv/bin/fedbiscuit run configs/hh_centralized.yaml name=hb_central$sfx \
          seed=$seed "data.subsets=[helpful-base]" output_dir=runs/issue18 --quiet --overwrite > runs/issue18/hb_central$sfx.log 2>&1
        echo "hb_central$sfx done $(date +%T)" >> runs/issue18/arms.done ;;
  esac
}
arm $1 & { [ -n "${2:-}" ] && arm $2; } & wait
