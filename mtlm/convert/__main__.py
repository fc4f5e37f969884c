import sys

from mtlm.convert.cli import main

sys.exit(main())
