"""`cascade-rt serve`: the images API, its batcher and its Ray Serve deployment (docs/serving.md)."""
