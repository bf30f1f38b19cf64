import sys

from sage_cli.app import main

sys.exit(main())
