"""Ray Train: the worker loop (a recipe), its data, and the driver that launches it."""
