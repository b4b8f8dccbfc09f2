"""Build (or check) the cached selector path's trunk states for every pair a config uses, and measure it.

Reports pairs per second, bytes stored per pair, the store's size, and the process's peak RSS, which should be
what one trunk batch needs, not the size of the cache. The store is content-addressed: a second run finds
every pair and builds nothing.

    python benchmarks/trunk_cache.py configs/hh_centralized.yaml           # all HH train + test pairs
    python benchmarks/trunk_cache.py configs/hh_centralized.yaml selector.max_length=128
"""

from __future__ import annotations

import json
import resource
import sys
import time

from common import config_parser, write_json


def main() -> None:
    args = config_parser(__doc__).parse_args()

    import torch

    from fedbiscuit.config import load_config
    from fedbiscuit.models.loading import cpu_flags
    from fedbiscuit.pipeline import open_workspace

    cfg = load_config(args.config, args.overrides)
    if cfg.selector.path != "cached":
        sys.exit("the config does not use selector.path=cached")
    start = time.perf_counter()
    ws = open_workspace(cfg, quiet=False)
    load_s = time.perf_counter() - start
    enc = ws.encoder
    pairs = [p for c in ws.data.clients.values() for p in c.train + c.heldout]
    pairs += [p for members in ws.data.all_test().values() for p in members]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bytes_before = enc.store.nbytes
    start = time.perf_counter()
    encoded = enc.encode(pairs)
    build_s = time.perf_counter() - start
    tokens = sum(enc.length(e) for e in encoded)
    built = enc.stats["built"]
    added = enc.store.nbytes - bytes_before
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    out = {
        "pairs": len(encoded),
        "sequences": 2 * len(encoded),
        "built": built,
        "found": enc.stats["found"],
        "build_s": build_s,
        "pairs_per_s": built / build_s if built else None,
        "bytes_per_pair": added / built if built else enc.store.nbytes / max(1, len(enc.store)),
        "store_bytes": enc.store.nbytes,
        "store_entries": len(enc.store),
        "mean_tokens_per_sequence": tokens / max(1, len(encoded)),
        "model_load_s": load_s,
        "peak_rss_mb_before_build": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dtype": str(next(ws.model.parameters()).dtype),
        "device": str(next(ws.model.parameters()).device),
        "threads": torch.get_num_threads(),
        "cpu_flags": flags,
        "folder": str(enc.store.folder),
    }
    print(json.dumps(out, indent=1))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
