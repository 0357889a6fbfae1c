"""The `adb` command line (installs as adapterdb.cli)."""
