"""Command-line tools and benchmarks for bugforge."""
