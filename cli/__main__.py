"""`python -m qfedit ...` is the `qfedit` command (the embedded worker child is started this way)."""

from cli import main

main()
