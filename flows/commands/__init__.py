"""`vadflow` sub-commands that live outside flows/cli.py (registered there)."""
