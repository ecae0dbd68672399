"""Writes docs/guide/flags.md, the reference of every script's flags, from the flags themselves.

  python3 scripts/flag_reference.py
"""

import pathlib

from jaxlab import cli

SCRIPTS = pathlib.Path(__file__).resolve().parent
TARGET = SCRIPTS.parent / "docs" / "guide" / "flags.md"


@cli.user_errors_exit
def main(argv: list[str]) -> None:
  del argv
  cli.write_outputs((str(TARGET), cli.flag_reference(sorted(SCRIPTS.glob("*.py")))))
  print(f"wrote {TARGET}")


if __name__ == "__main__":
  cli.run(main)
