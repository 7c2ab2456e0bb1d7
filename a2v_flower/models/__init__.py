"""Models: the frozen audio encoder, the text encoders that make class targets, and the adapters."""
