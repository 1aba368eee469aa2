"""The job files shipped with specdraft (package data: `specdraft run` and `specdraft compare` find them in a wheel too)."""
