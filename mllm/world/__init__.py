"""The synthetic scene world: scenes (sampling, rendering, texts), the task-file writer, the tokenizer corpus."""
