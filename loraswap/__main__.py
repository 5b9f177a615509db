import sys

from loraswap.cli import main

sys.exit(main())
