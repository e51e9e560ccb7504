"""Tab completion: a pure analysis (engine), named data sources, and the completer."""
