"""Stage entry points: each runs as `python -m nanopipe.stages.<name>` alone or under torchrun."""
