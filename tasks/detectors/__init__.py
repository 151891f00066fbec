"""Anomaly detector families behind one interface, found by name through a registry.

`registry.py` lists, checks and loads families (`family_names`, `create_detector`,
`load_detector`); `base.py` is the interface; each folder here is one family whose
`@register` decorator adds it when the registry first asks for it. Importing this package
imports nothing heavy, so the CLI can check a family name before torch loads.
"""
