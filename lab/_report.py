"""The lab tools' shared ending: a tool's table printed, and written to its --out file where one is given."""
import os


def report(text: str, out: str = "") -> None:
  """Prints `text`; with `out`, also writes it there (its folder made if missing)."""
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")
