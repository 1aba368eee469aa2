"""Command drivers that are not stages: `specdraft eval`, `compare`, `serve-check` and `report`."""
