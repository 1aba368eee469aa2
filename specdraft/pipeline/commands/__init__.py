"""Command drivers that are not stages: `specdraft eval` and `specdraft compare`."""
