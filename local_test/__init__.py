"""Tools for running the recommender on a laptop: a local Feature Store, scripts and payloads."""
