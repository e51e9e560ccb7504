"""shell package."""
