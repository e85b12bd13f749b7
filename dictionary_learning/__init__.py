"""Base layer: dictionaries, model loading, data. Never imports the top-level modules."""
