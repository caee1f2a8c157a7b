"""CLI subcommand implementations (one module each)."""
