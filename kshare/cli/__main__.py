"""`python -m kshare.cli`: what `torchrun -m kshare.cli` starts."""

from kshare.cli import main

if __name__ == "__main__":
    main()
