"""`python3 -m zfsmgr` and the zipapp's entry point."""

import sys

from zfsmgr.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
