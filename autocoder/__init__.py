"""autocoder: a prompt in, working Python code out, run in a managed Jupyter kernel."""

__version__ = "0.1.0"


def load_ipython_extension(ipython):  # type: ignore[no-untyped-def]
    """`%load_ext autocoder` registers the `%autocoder` magics."""
    from autocoder.magic import load_ipython_extension as load

    load(ipython)
