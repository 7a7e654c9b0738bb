import sys

from crt.cli.main import main

sys.exit(main())
