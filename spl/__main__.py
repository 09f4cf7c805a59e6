"""`python -m spl` is the `spl` command."""

from spl.cli import main

if __name__ == "__main__":
    main()
