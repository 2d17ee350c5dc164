"""`python -m mrmae` (and so `torchrun ... -m mrmae`) runs the CLI."""

from mrmae.cli import main

if __name__ == "__main__":
    main()
