"""Commands around a run: export, visualize, plot, and the demo."""
