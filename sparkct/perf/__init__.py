"""Performance reporting: device peaks, rooflines, and the README's generated benchmark sections."""
