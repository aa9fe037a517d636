"""apexdistill: APEX one-step distillation on Ray."""
__version__ = "0.1.0"
