"""The `emoq` command: one module per subcommand, each parsing its arguments and calling the library."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
