"""Data: real corpora shipped in packages, generic file readers, tokenizer training."""
