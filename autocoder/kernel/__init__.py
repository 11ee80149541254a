"""Kernels: the execute conversation (`client`), what collects outputs (`output`), the seam
every way to get a kernel plugs into (`backend`), the pool that chooses a backend (`pool`),
and one module per backend: `local` (exec'd here), `fork` (forked from the zygote), `gateway`
(a Jupyter Kernel/Enterprise Gateway). `provisioner` is what other Jupyter servers launch
autocoder's kernelspecs with; `leftovers` finds what a killed autocoder left behind.

This face imports nothing: `gateway_ws` is loaded by a gateway process that has no use for
the rest."""
