"""`python -m openrelease` and `torchrun -m openrelease ...` enter the CLI here."""

from openrelease.cli import main

if __name__ == "__main__":
    main()
