import sys

from ibot_engine.cli import main

sys.exit(main())
