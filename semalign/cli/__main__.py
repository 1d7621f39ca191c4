"""`python -m semalign.cli`: the same as the `semalign` console script."""
from semalign.cli import main

main()
