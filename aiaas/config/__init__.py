"""Config schemas (one pydantic model per YAML kind) and the one loader that reads them."""
