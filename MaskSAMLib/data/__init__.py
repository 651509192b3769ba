"""The data stage: reading/writing volumes, dataset.json, preprocessing and its inverse."""
