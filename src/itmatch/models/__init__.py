"""Models assembled from the shared encoders, and the contract every model keeps."""
