"""Training data: batch types, image sources, multi-crop augmentation (CPU and GPU), block masks, the resumable
streams (image folders and built-in data in loader.py, WebDataset shards in shards/) and a per-epoch DataLoader."""
