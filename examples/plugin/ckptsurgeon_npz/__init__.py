"""NumPy ``.npz`` checkpoints and a ``scale`` op, as a ckptsurgeon plug-in."""
