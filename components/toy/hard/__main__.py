"""`python -m components.toy.hard judges|base|sdxl|decoder|evaluate [--set key=value ...]`: build the hard toy.

The edge of the hard toy: it parses `--set` overrides into `HardToyConfig`, pins the torch
thread count, and prints progress one line per report (every `--every` steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from components.progress import Progress
from components.toy.hard.config import HardToyConfig


def _config(pairs: list[str]) -> HardToyConfig:
    values: dict = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return HardToyConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.toy.hard")
    parser.add_argument("command", choices=["judges", "base", "sdxl", "decoder", "evaluate"])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--every", type=int, default=25, help="print one progress line every N steps")
    parser.add_argument("--checkpoint", default=None, help="evaluate: an ema-STEP.pt instead of base_dir")
    parser.add_argument("--sdxl", action="store_true", help="evaluate, decoder: the SDXL-family base in sdxl_dir")
    parser.add_argument("--report", default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)
    s = _config(args.sets)
    torch.set_num_threads(s.threads)
    start = time.time()

    def progress(p: Progress) -> None:
        if p.step % args.every == 0 or p.step == p.total:
            metrics = " ".join(f"{k}={v:.4g}" for k, v in p.metrics.items())
            print(f"[{time.time() - start:7.1f}s] {p.stage} {p.step}/{p.total} {metrics}", flush=True)

    if args.command == "judges":
        from components.toy.hard.world import build_judges
        report = build_judges(s, progress)
    elif args.command == "base":
        from components.toy.hard.world import build_hard_base
        report = build_hard_base(s, progress)
    elif args.command == "sdxl":
        from components.toy.hard.world import build_hard_sdxl
        report = build_hard_sdxl(s, progress)
    elif args.command == "decoder":
        from components.toy.hard.world import finetune_base_decoder
        report = finetune_base_decoder(s, args.sdxl, progress)
    else:
        from components.toy.hard.evaluate import evaluate_base
        report = evaluate_base(s, args.checkpoint, progress, sdxl=args.sdxl)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
