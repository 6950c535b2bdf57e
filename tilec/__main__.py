from tilec.cli import entry

entry()
