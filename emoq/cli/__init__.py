"""The `emoq` command: one module per subcommand, each parsing its arguments and calling the library."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
