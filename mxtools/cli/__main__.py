"""`python -m mxtools.cli`: the command line, as the `mxtools` script runs it."""
from . import main

main()
