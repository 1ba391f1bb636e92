"""The `compressor` command: the parser (parser.py), one thin function per command (commands.py),
exit codes (main.py)."""
