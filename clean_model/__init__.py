"""The hand-written clean transformer that every exercise is generated from."""
