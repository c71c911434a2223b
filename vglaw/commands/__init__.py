"""The `vglaw` commands other than Lightning's: each parses its argv, then calls the library.

A command the `vglaw` dispatcher runs imports only the standard library and `vglaw.errors` /
`vglaw.io` at the top, so `vglaw <command> --help` answers without loading torch; the library is
imported in `main` once the arguments are read (`demo`, run by `make demo`, imports it at once).
Nothing in the library imports a command.
"""

# The inference precisions (`vglaw.inference.precision.PRECISIONS`), for argparse choices without torch.
PRECISIONS = ("fp32", "bf16", "int8")
PRECISION_HELP = ("fp32 (as trained), bf16 (autocast; fast only on CPUs with avx512_bf16 / AMX) or int8 (dynamic "
                  "quantisation of the linear layers, CPU); accuracy per precision: docs/benchmarks.md")
