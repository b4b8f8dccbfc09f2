"""The trunk pass (frozen blocks, no gradient) with three layouts of a pair's two orders, on the same HH pairs.

  whole       both orders as full sequences: 2 x (prefix + suffix) positions
  pieces      the prefix once, then both suffixes on its cache (the layout of revision --rev): prefix + 2
              suffixes, but three separately padded pieces
  first+rest  the (a, b) order whole, then the (b, a) suffix on the prefix it left in the cache (today's
              layout): prefix + 2 suffixes, two padded pieces

Each layout batches as the cache build does (4,096 positions, pairs sorted by length) and is timed after one
warm-up batch; the states each layout produces are compared with the first's.

    python benchmarks/trunk_layouts.py --rev 6baf53d --pairs 400
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import ROOT, hh_cached_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="a revision whose trunk.py has the 'pieces' layout")
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument(
        "--data", default=os.environ.get("FEDBISCUIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    )
    args = p.parse_args()

    import importlib.util

    from fedbiscuit.config import config_from_dict
    from fedbiscuit.pipeline import open_workspace
    from fedbiscuit.selector import trunk

    source = subprocess.run(
        ["git", "show", f"{args.rev}:src/fedbiscuit/selector/trunk.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("fedbiscuit.selector._trunk_then", fh.name)
    then = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(then)

    cfg = config_from_dict(hh_cached_config(args.data, top_layers=4))
    ws = open_workspace(cfg, quiet=True)
    enc = ws.encoder
    per = args.pairs // len(ws.data.clients)
    raw = [q for c in ws.data.clients.values() for q in c.train[:per]]
    pairs = trunk.PairEncoder.encode(enc, raw)  # token ids only: nothing is built yet

    def batches(order):
        out, i = [], 0
        while i < len(order):
            j, widest = i, 0
            while j < len(order):
                widest = max(widest, enc.length(order[j]))
                if (j - i + 1) * 2 * widest > enc.build_tokens and j > i:
                    break
                j += 1
            out.append(order[i:j])
            i = j
        return out

    layouts = {
        "whole": (trunk.CachedEncoder._trunk_whole, enc.length),
        "pieces": (then.CachedEncoder._trunk, lambda q: (len(q.prompt), len(q.a) + len(q.b))),
        "first+rest": (trunk.CachedEncoder._trunk, lambda q: (enc.length(q), len(q.a) + len(q.b))),
    }
    print(
        f"{len(pairs)} HH train pairs, threads={torch.get_num_threads()}, dtype={next(ws.model.parameters()).dtype}"
    )
    print("| layout | trunk pairs/s | largest relative difference from 'whole' (bf16 states, per piece) |")
    print("|---|---|---|")
    ref = None
    for name, (fn, key) in layouts.items():
        order = sorted(pairs, key=key)
        bs = batches(order)
        fn(enc, bs[0])  # warm-up
        start = time.perf_counter()
        states = [s for b in bs for s in fn(enc, b)]
        rate = len(pairs) / (time.perf_counter() - start)
        got = {id(q): s for q, s in zip(order, states, strict=True)}
        if ref is None:
            ref, diff = got, 0.0
        else:
            diff = max(
                float((got[k][j].float() - ref[k][j].float()).norm() / ref[k][j].float().norm())
                for k in ref
                for j in range(3)
            )
        print(f"| {name} | {rate:.1f} | {diff:.3g} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
