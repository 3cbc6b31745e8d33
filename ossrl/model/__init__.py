"""ossrl.model (see docs/design.md for this layer's role)."""
