"""backhaul.adapters: composition and all I/O (store, read models, files, engine, API, CLI)."""
