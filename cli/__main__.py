"""`python -m adapterdb.cli`: the same app, for `accelerate launch -m adapterdb.cli train ...`."""

from adapterdb.cli.app import main

main()
