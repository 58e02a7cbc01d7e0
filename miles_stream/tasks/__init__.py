"""Tasks shipped with the project: datasets, a verifiable reward each, and a model shaped for them."""
