"""The networks: ViT backbone (vit.py) with its attention backends (attention.py), the projection head (head.py),
and student + EMA teacher with their centres (ibot.py)."""
