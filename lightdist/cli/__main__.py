import sys

from lightdist.cli import main

sys.exit(main())
