"""Audio data: the ESC-50 layout, a synthetic stand-in, and partitioning across sites."""
