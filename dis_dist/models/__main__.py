"""``python -m dis_dist.models``: parameters, tokens and forward GFLOPs of every registry model."""

from __future__ import annotations

import argparse

from dis_dist.models.dis import MODEL_NAMES
from dis_dist.models.flops import count_parameters, model_flops


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dis_dist.models", description=__doc__)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="image sizes (px)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--vae-factor", type=int, default=8, help="image px per latent px")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    args = p.parse_args(argv)
    print("Forward FLOPs per image; 1 multiply-add = 2 FLOPs, elementwise ops 1 FLOP each.")
    header = (
        f"{'model':<10} {'res':>5} {'latent':>7} {'params':>14} {'tokens':>7} "
        f"{'matmul':>9} {'scan':>8} {'other':>8} {'GFLOPs':>9}"
    )
    print(header)
    print("-" * len(header))
    for res in args.resolutions:
        latent = res // args.vae_factor
        for name in MODEL_NAMES:
            kw = dict(input_size=latent, in_channels=args.channels, num_classes=args.num_classes)
            patch = int(name.rsplit("/", 1)[1])
            if latent % patch:
                continue
            f = model_flops(name, **kw)
            params = count_parameters(name, **kw)
            tokens = (latent // patch) ** 2 + (2 if args.num_classes else 1)
            print(
                f"{name:<10} {res:>5} {latent:>4}x{latent:<2} {params:>14,} {tokens:>7} "
                f"{f.matmul / 1e9:>9.2f} {f.scan / 1e9:>8.2f} {(f.conv + f.elementwise) / 1e9:>8.2f} "
                f"{f.total / 1e9:>9.2f}"
            )


if __name__ == "__main__":
    main()
