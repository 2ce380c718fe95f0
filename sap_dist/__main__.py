import sys

from sap_dist.cli import main

sys.exit(main())
