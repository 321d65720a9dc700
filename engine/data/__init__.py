"""Training data. The stream the trainer reads (`stream.py`: the `BatchStream` contract and `build_data_stream`) is a
source plus an augmenter:
* sources: image folders and built-in data (`sources.py`, over `folder.py`, `synthetic.py`, `digits.py`), WebDataset
  shards (`shards/`: write, resolve, source);
* augmenters (`augment.py`): the multi-crop views on the CPU (`cpu_aug.py`) or on the device (`gpu_aug.py`), their
  random parameters (`views.py`), the ImageNet normalisation (`normalise.py`);
* the batch types and the masking collate (`batch.py`, block masks in `masking.py`).
`epoch_loader.py` gives the same batches as a per-epoch torch `DataLoader`, for other loops (plain PyTorch,
Lightning)."""
