"""The `%autocoder` door: `magics` (the magics, parsing and translating) over `shell` (the
in-kernel executor: the main thread, the watchdog's interrupts, the tee into the cell)."""

from autocoder.magic.magics import load_ipython_extension

__all__ = ["load_ipython_extension"]
