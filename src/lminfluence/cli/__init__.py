"""The command line: thin commands that validate a config, save it, and call the library."""
