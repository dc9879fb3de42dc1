"""The engine side: model loading, chunk keys, save/load, speculative decode (issue 6)."""
