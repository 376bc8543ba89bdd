"""Rule families, one module each; every Rule subclass defined here is registered."""
