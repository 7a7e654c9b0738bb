from crt.cli.main import entry

entry()
