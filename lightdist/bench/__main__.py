"""``python -m lightdist.bench``: see :mod:`lightdist.bench`."""

from lightdist.bench.cli import main

raise SystemExit(main())
