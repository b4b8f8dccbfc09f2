"""How far answer length alone goes: the reference point for the selectors' agreement on HH-RLHF.

Each pair is decided by the token lengths of its two answers (SmolLM2's tokenizer, the whole answer, no
truncation): "prefer the longer" or "prefer the shorter". The direction is learned on the training split (its
held-out slice included), never on the test split, in two ways:

  one direction   the same rule for everybody (the best one selector could do with length alone)
  per subset      each HH subset its own rule (the best a clustering along subsets could do)

and judged on every test pair, per subset and overall, with 95% Wilson intervals. Equal lengths count half.

    python benchmarks/length_baseline.py configs/hh_centralized.yaml --json runs/bench/length_baseline.json
"""

from __future__ import annotations

from collections import defaultdict

from common import config_parser, write_json


def longer_wins(pair, lengths) -> float:
    """1 if people preferred the longer answer, 0 the shorter, 0.5 for equal lengths."""
    a, b = lengths(pair.response_a), lengths(pair.response_b)
    if a == b:
        return 0.5
    return float((a > b) == (pair.label > 0.5))


def main() -> None:
    args = config_parser(__doc__).parse_args()

    from fedbiscuit.config import load_config
    from fedbiscuit.data import prepare_data
    from fedbiscuit.models.loading import load_model
    from fedbiscuit.selector.metrics import wilson_interval

    cfg = load_config(args.config, args.overrides)
    data = prepare_data(cfg.data, seed=cfg.seed)
    _, tokenizer = load_model(cfg.model, seed=cfg.seed)
    memo: dict[str, int] = {}

    def lengths(text: str) -> int:
        if text not in memo:
            memo[text] = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return memo[text]

    def subset(pair) -> str:
        return pair.client.split("#")[0]

    train = [q for c in data.clients.values() for q in c.train + c.heldout if q.label != 0.5]
    test = [q for pairs in data.all_test().values() for q in pairs if q.label != 0.5]
    # the direction: does "prefer the longer" win on more than half of the training pairs?
    by = defaultdict(list)
    for q in train:
        by[subset(q)].append(longer_wins(q, lengths))
    share = {s: sum(v) / len(v) for s, v in by.items()}
    overall_share = sum(sum(v) for v in by.values()) / len(train)
    rules = {
        "one direction": {s: overall_share > 0.5 for s in by},
        "per subset": {s: x > 0.5 for s, x in share.items()},
    }

    out = {
        "train_pairs": len(train),
        "test_pairs": len(test),
        "train_longer_preferred": {"overall": overall_share} | share,
        "rules": {},
    }
    for rule, longer in rules.items():
        scores = defaultdict(list)
        for q in test:
            w = longer_wins(q, lengths)
            scores[subset(q)].append(w if longer[subset(q)] else 1.0 - w)
        scores["overall"] = [x for s in list(scores) for x in scores[s]]
        out["rules"][rule] = {
            s: {
                "direction": "overall" if s == "overall" else ("longer" if longer[s] else "shorter"),
                "n": len(v),
                "agreement": sum(v) / len(v),
                "ci95": list(wilson_interval(sum(v), len(v))),
            }
            for s, v in scores.items()
        }
    print(f"{len(train)} training pairs (direction), {len(test)} test pairs; SmolLM2 tokens, whole answers")
    print(
        "training split, share where the longer answer was preferred: "
        + ", ".join(f"{s} {100 * x:.1f}%" for s, x in out["train_longer_preferred"].items())
    )
    subsets = sorted(share)
    print("| rule | " + " | ".join(subsets) + " | overall [95% CI] |")
    print("|---" * (len(subsets) + 2) + "|")
    for rule, rows in out["rules"].items():
        cells = [
            f"{100 * rows[s]['agreement']:.1f}% ({rows[s]['direction']}, n={rows[s]['n']})" for s in subsets
        ]
        o = rows["overall"]
        cells.append(
            f"{100 * o['agreement']:.1f}% [{100 * o['ci95'][0]:.1f}, {100 * o['ci95'][1]:.1f}] (n={o['n']})"
        )
        print(f"| {rule} | " + " | ".join(cells) + " |")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
