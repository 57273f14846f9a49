"""Compare two pipeline output folders file by file: every data and ledger Parquet shard (and
pack_stats.json, balance_report.json), by SHA-256; manifests (timings) and training runs are left
out. Used to show that a refactor changes no output byte: run `ovpipe demo --out X` on the old and
the new code into the same path X (outputs hold absolute paths), move the first aside, compare.

    python scripts/compare_outputs.py OLD_DIR NEW_DIR     # exit 1 if a common file differs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPORT_FILES = ("pack_stats.json", "balance_report.json")


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or "_manifest" in rel.parts or rel.parts[0] in ("train", "runs"):
            continue
        if p.suffix == ".parquet" or p.name in REPORT_FILES:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args(argv)
    a, b = digests(args.old), digests(args.new)
    common = sorted(set(a) & set(b))
    differ = [k for k in common if a[k] != b[k]]
    print(json.dumps({
        "common_files": len(common), "identical": len(common) - len(differ),
        "data_shards": sum(1 for k in common if not any(part.startswith("_") for part in Path(k).parts)),
        "ledgers": sum(1 for k in common if "_ledger" in Path(k).parts),
        "differ": differ, "only_old": sorted(set(a) - set(b)), "only_new": sorted(set(b) - set(a)),
    }, indent=1))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
