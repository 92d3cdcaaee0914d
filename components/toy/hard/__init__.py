"""The hard toy world: 64x64 compositional images of two coloured sklearn digits (issue 12)."""
