"""How faithful a miniature of Stable Diffusion the reference prior is: one table, printed and written in its card.

    .venv/bin/python benchmarks/prior_properties.py [--model PRIOR] [--results docs/results/summary.json]

Measures the autoencoder's floor on every bundled dataset, its reconstruction of held-out scenes inside and outside the
concept set, the UNet's text following over 200 concepts, and reads the pre-training's wall time from the prior's
training/timings.json and DYOD's verdict per dataset from benchmarks/results.py's summary; writes PRIOR/MODEL_CARD.md,
PRIOR/training/properties.json and the curves and samples beside them (docs/reference-prior.md)."""

from __future__ import annotations

import argparse
import time

from dyod.prior import bundled_prior_path
from dyod.world.prior_card import card_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a prior made by dyod reference pretrain (default: the bundled one)")
    parser.add_argument("--results", default="docs/results/summary.json", help="benchmarks/results.py's summary")
    parser.add_argument("--n", type=int, default=400, help="images per set for the autoencoder's properties")
    parser.add_argument("--n-captions", type=int, default=200, help="concepts for text following")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    started = time.time()
    model = args.model or bundled_prior_path()
    card, rows = card_for(model, args.results, device=args.device, n=args.n, n_captions=args.n_captions)
    width = max(len(r[0]) for r in rows)
    print(f"{'property':<{width}}  {'measured':<40}  {'target':<26}  met")
    for prop, measured, target, met in rows:
        print(f"{prop:<{width}}  {measured:<40}  {target:<26}  {'yes' if met else 'NO'}")
    print(f"\nmodel card: {card} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
