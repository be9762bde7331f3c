"""Entry point of ``python -m interheap`` (see :mod:`interheap._cli`)."""

from interheap._cli import main

if __name__ == "__main__":
    main()
