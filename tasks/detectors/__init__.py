"""Anomaly detector families behind one interface, found by name through a registry.

`registry.py` lists, checks and loads families (`family_names`, `create_detector`,
`load_detector`); `settings.py` turns site and command-line settings into a family's config;
`base.py` is the interface; `components/` holds the parts families share (the training loop
and `TrainingConfig`, augmentation, patch features, GAN parts, latent density, anomaly maps);
each other folder here is one family whose `@register` decorator adds it when the registry
first asks for it. Importing this package imports nothing heavy, so the CLI can check a family
name before torch loads.
"""
