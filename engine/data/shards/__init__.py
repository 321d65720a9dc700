"""WebDataset shards: `write.py` (`ibot shards write`), `resolve.py` (what `data.shards` names), `stream.py` (the
training stream that reads them)."""
