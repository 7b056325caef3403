"""The ``logix`` command line.

    logix inspect RUN_DIR       what a run holds: passes, modules, stores, statistics
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from logix.errors import LogixError
from logix.statistics import Statistics
from logix.store import Store
from logix.store.format import read_manifest


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inspect_run(run_dir: Path) -> str:
    """A readable summary of a run directory (or of a single store directory)."""
    if read_manifest(run_dir) is not None:
        return _describe_store(run_dir.name, Store(run_dir))
    info_path = run_dir / "run.json"
    if not info_path.exists():
        raise LogixError(f"{run_dir} is not a logix run directory (no run.json).")
    info = json.loads(info_path.read_text())
    lines = [
        f"run        {run_dir}",
        f"passes     {info['passes']} (done: {info['done']}; finalized: {info['finalized']})",
        f"projection {info['identity']['projection']['type']}",
        "versions   " + ", ".join(f"{k} {v}" for k, v in info.get("environment", {}).items()
                                   if k in ("logix", "torch", "transformers", "python")),
    ]
    stores = sorted(p for p in (run_dir / "stores").glob("*") if read_manifest(p) is not None)
    for path in stores:
        lines += ["", _describe_store(path.name, Store(path))]
    stats_path = run_dir / "statistics" / "log.safetensors"
    if stats_path.exists():
        stats = Statistics.load(stats_path)
        keys = sorted({k.split("::")[1] for k in stats.flat()})
        lines += ["", f"statistics {keys} for {len(stats.modules)} modules ({stats_path.name})"]
    return "\n".join(lines)


def _describe_store(name: str, store: Store) -> str:
    ids = store.ids
    head = ", ".join(map(str, ids[:3])) + (", ..." if len(ids) > 3 else "")
    lines = [
        f"store {name!r}: {store.n_rows} rows in {store.n_shards} shards, dtype {store.dtype_name}, "
        f"{store.dim} values per row, {_human(store.nbytes())}" + (" (per token)" if store.per_token else ""),
        f"  ids: {head}",
        f"  {'module':<40}{'kind':<11}{'block':>12}",
    ]
    for block in store.layout.blocks:
        lines.append(f"  {block.name:<40}{block.kind:<11}{str(block.shape):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logix", description="logix: data attribution logs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="show what a run directory holds")
    p_inspect.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_run(args.run_dir))
    except (LogixError, OSError, KeyError) as exc:
        print(f"logix: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
