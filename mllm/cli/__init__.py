"""The command line: `mllm.cli.main` is the one table of verbs; each verb's module parses its arguments and calls
the library."""
