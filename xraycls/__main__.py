import sys

from xraycls.cli import main

sys.exit(main())
