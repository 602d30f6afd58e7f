"""``python -m moco_fast.train`` / ``moco-fast-train``: MoCo training (see ``--help``)."""

from __future__ import annotations

import sys

from .config import ConfigError, config_json, parse_config


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_config(argv)
        if args.print_config:
            print(config_json(cfg))
            return 0
        from .loop import train

        train(cfg)
    except ConfigError as exc:
        print(f"moco-fast-train: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
