"""How much of an AdamW step is signal at a client's batch and at the centralized run's? A diagnostic for
FedBis's gap to the centralized selector at the same sequential steps.

AdamW moves a coordinate by lr * m / sqrt(v), where v tracks the mean square of the batch gradient: mu^2 +
sigma^2 / b for a coordinate whose per-pair gradient has mean mu and variance sigma^2 at batch size b. Where
noise dominates (sigma^2 / b >> mu^2) a batch of 2 has twice the denominator of a batch of 8, so each step
carries half the signal; FedBis's clients take 2-pair steps (4 clients a round together see the 8 pairs of one
centralized step), and averaging the 4 clients cuts the noise of their steps, not that loss of signal.

From one selector (a finished run's last checkpoint, or the untrained adapter), the per-pair gradients of the
choice loss (both orders) over N training pairs of the config's clients give mu and sigma^2 per adapter
coordinate. Printed for b = 1, 2, 4, 8, 16: the first-order progress of one expected step, sum(mu^2 /
sqrt(mu^2 + sigma^2 / b)) (the decrease of the loss per unit rate, momentum and clipping aside), relative to
b = 8; and the share of coordinates where noise dominates at b. Its inverse at b = 2 is the rate multiple a
2-pair client needs to move as far along the mean gradient per step as the centralized run.

    python benchmarks/adam_noise.py configs/hh_fedbis.yaml "data.subsets=[helpful-base]" --pairs 128 \\
        --run runs/issue18/hb_a7_seq
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from common import ROOT, config_parser, write_json


def main() -> None:
    p = config_parser(__doc__)
    p.add_argument(
        "--run", default="untrained", help="a federated run folder (its last checkpoint) or untrained"
    )
    p.add_argument("--pairs", type=int, default=128, help="training pairs, taken in turn from each client")
    args = p.parse_args()
    os.environ.setdefault("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))

    from fedbiscuit.config import load_config
    from fedbiscuit.federated.checkpoint import list_checkpoints, load_checkpoint
    from fedbiscuit.federated.client import WORK_ADAPTER
    from fedbiscuit.models.adapters import adapter_state, load_adapter_state
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector.training import choice_loss

    cfg = load_config(args.config, args.overrides)
    ws = open_workspace(cfg, quiet=True)
    model = ws.model
    if args.run == "untrained":
        state = adapter_state(model, WORK_ADAPTER)
    else:
        state = next(
            iter(load_checkpoint(list_checkpoints(Path(args.run) / "checkpoints")[-1]).selectors.values())
        )
    load_adapter_state(model, WORK_ADAPTER, state)
    model.set_adapter(WORK_ADAPTER)
    model.eval()  # no dropout: the gradient, not a sample of it
    # the clients' training pairs interleaved, so N pairs draw on every client alike
    per_client = [ws.encoder.encode(c.train) for c in ws.data.clients.values()]
    pairs = [p for group in zip(*per_client, strict=False) for p in group][: args.pairs]
    params = [w for w in model.parameters() if w.requires_grad]
    device = next(model.parameters()).device
    grads = []
    for pair in pairs:  # one pair, both orders, per backward: the per-pair gradient
        model.zero_grad(set_to_none=True)
        logits, target = ws.encoder.logits(model, [pair], True, ws.choice_ids, device)
        choice_loss(logits.float(), target.float()).backward()
        grads.append(torch.cat([w.grad.detach().flatten().double() for w in params]).cpu())
    g = torch.stack(grads)  # [N, coordinates]
    mu, var = g.mean(0), g.var(0)
    live = var > 0  # coordinates the loss reaches (with B = 0, an untrained LoRA's A gets no gradient)
    # mu^2 unbiased: the square of a mean over N pairs overstates it by sigma^2 / N
    mu2, var = (mu[live] ** 2 - var[live] / len(pairs)).clamp_min(0), var[live]
    sizes = [1, 2, 4, 8, 16]

    def progress(b: int) -> float:
        return float((mu2 / (mu2 + var / b).sqrt()).sum())

    ref = progress(8)
    rows = [
        {
            "batch": b,
            "progress_vs_8": progress(b) / ref,
            "noise_dominated": float((var / b > mu2).double().mean()),
        }
        for b in sizes
    ]
    print(
        f"selector: {args.run}; {len(pairs)} pairs of {len(per_client)} clients; {int(live.sum())} live coordinates"
    )
    print("| batch | progress per step, relative to 8 | share of coordinates noise-dominated |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['progress_vs_8']:.3f} | {r['noise_dominated']:.3f} |")
    write_json(args.json, {"run": args.run, "pairs": len(pairs), "rows": rows})


if __name__ == "__main__":
    main()
