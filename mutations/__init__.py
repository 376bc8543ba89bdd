"""libcst rules that plant bugs in the clean transformer, and the engine that applies them."""
