"""The `vglaw` commands other than Lightning's: each parses its argv, then calls the library.

A command the `vglaw` dispatcher runs imports only the standard library and `vglaw.errors` /
`vglaw.io` at the top, so `vglaw <command> --help` answers without loading torch; the library is
imported in `main` once the arguments are read (`demo`, run by `make demo`, imports it at once).
Nothing in the library imports a command.
"""
