"""Calibration for data-dependent methods: data specs and inputs, device placement, diagonal Fishers."""
