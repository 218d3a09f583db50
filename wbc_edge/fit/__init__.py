"""Offline fitting on a bundle: site adaptation (`adapt`). Needs the `train` extra; the runtime never imports it."""
