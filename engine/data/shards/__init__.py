"""WebDataset shards: `write.py` (`ibot shards write`), `resolve.py` (what `data.shards` names), `source.py` (the
training stream's source that reads them)."""
